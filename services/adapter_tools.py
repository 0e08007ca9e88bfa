"""`lorafleet adapters validate | push | ls`: putting PEFT adapters where the adapter store finds them.

    lorafleet adapters validate DIR --model M            # the store's own checks, before any upload
    lorafleet adapters push DIR ROOT/ID --model M        # validate, then upload (file:// or s3://)
    lorafleet adapters ls ROOT                           # adapter ids under a root, with sizes

Push writes the weights before the config, each object whole (an S3 PUT, or obstore's
write-then-rename on a folder): the store treats a folder as an adapter only once both files are
there, so a reader never sees a half-written adapter. Over an existing adapter (--replace), the
old config goes first, so a reader meanwhile finds no adapter (never new weights with an old
config). The progress bar (tqdm) shows the weights' bytes, on a terminal only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import obstore

from lorafleet.common import settings
from lorafleet.common.adapter_root import CONFIG_FILE, WEIGHTS_FILE, S3Options, adapter_sizes, open_root
from lorafleet.common.ids import validate_adapter_id
from lorafleet.common.progress import counter_bar
from lorafleet.formats.model_spec import ModelSpec
from lorafleet.formats.peft_config import InvalidAdapterError

CHUNK_BYTES = 8 << 20  # upload chunk (and progress step)


def add_adapters_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="adapters_command", required=True)
    validate = sub.add_parser("validate", help="check an adapter folder as the adapter store would")
    validate.add_argument("dir", type=Path)
    push = sub.add_parser("push", help="validate an adapter folder, then upload it to ROOT/ID")
    push.add_argument("dir", type=Path)
    push.add_argument("target", help="adapter root and id: s3://bucket/prefix/tenant/name or file:///path/tenant/name")
    push.add_argument("--id-parts", type=int, default=2, help="trailing path parts of TARGET forming the id (2: tenant/name)")
    push.add_argument("--replace", action="store_true", help="overwrite an adapter already at ROOT/ID")
    for parser in (validate, push):
        settings.add_flag(parser, "--model", "MODEL", str, "the base model folder the adapter is checked against")
        settings.add_flag(parser, "--max-rank", "MAX_ADAPTER_RANK", int, "largest rank accepted")
    ls = sub.add_parser("ls", help="list the adapters under a root")
    ls.add_argument("root")


def run_adapters(args: argparse.Namespace) -> int:
    try:
        if args.adapters_command == "ls":
            for adapter_id, nbytes in list_adapters(args.root):
                print(f"{adapter_id}\t{nbytes}")
            return 0
        weights = validate_dir(args.dir, args.model, args.max_rank)
        print(f"ok: {args.dir} rank {weights.config.rank}, {len(weights.config.targets)} modules, {weights.nbytes} bytes")
        if args.adapters_command == "push":
            root, adapter_id = split_target(args.target, args.id_parts)
            push(args.dir, root, adapter_id, replace=args.replace)
            print(f"pushed: {root.rstrip('/')}/{adapter_id}")
        return 0
    except (InvalidAdapterError, ValueError, FileExistsError, OSError) as exc:
        print(f"{'invalid' if isinstance(exc, InvalidAdapterError) else 'error'}: {exc}", file=sys.stderr)
        return 1


def validate_dir(folder: Path, model: str | None, max_rank: int):
    """The store's validation (formats.lora_weights) of a PEFT folder against the base model: a
    LoraWeights. Imported here: `lorafleet --help` (and the gateway) run without torch."""
    from lorafleet.formats.lora_weights import load_peft_adapter_dir

    if not model:
        raise ValueError("validation needs the base model: pass --model or set LORAFLEET_MODEL")
    return load_peft_adapter_dir(folder, ModelSpec.from_pretrained(Path(model)), max_rank)


def split_target(target: str, id_parts: int) -> tuple[str, str]:
    parts = target.rstrip("/").split("/")
    root, adapter_id = "/".join(parts[:-id_parts]), "/".join(parts[-id_parts:])
    validate_adapter_id(adapter_id)
    return root, adapter_id


def _store(root: str):
    return open_root(root, S3Options.from_env())


def push(folder: Path, root: str, adapter_id: str, *, replace: bool = False) -> None:
    store = _store(root)
    existing = {obj["path"].rsplit("/", 1)[-1] for obj in obstore.list_with_delimiter(store, f"{adapter_id}/")["objects"]}
    if existing and not replace:
        raise FileExistsError(f"{root.rstrip('/')}/{adapter_id} already holds {sorted(existing)}; pass --replace")
    if CONFIG_FILE in existing:
        obstore.delete(store, f"{adapter_id}/{CONFIG_FILE}")  # readers find no adapter until the new config lands
    weights = folder / WEIGHTS_FILE
    size = weights.stat().st_size
    with weights.open("rb") as f, counter_bar(size, f"push {adapter_id}", "B") as bar:
        def chunks():
            while chunk := f.read(CHUNK_BYTES):
                bar.update(len(chunk))
                yield chunk

        obstore.put(store, f"{adapter_id}/{WEIGHTS_FILE}", chunks(), chunk_size=CHUNK_BYTES)
    obstore.put(store, f"{adapter_id}/{CONFIG_FILE}", (folder / CONFIG_FILE).read_bytes())  # last: the adapter appears


def list_adapters(root: str) -> list[tuple[str, int]]:
    """(adapter id, bytes of its two files) of every folder holding a config and weights."""
    return adapter_sizes(obj for batch in obstore.list(_store(root)) for obj in batch)
