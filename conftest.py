# Shared pytest fixtures for every test folder: a real Kafka-protocol broker and redis-server,
# a real S3 HTTP server, and the tiny models/adapters with their HF PEFT reference.
pytest_plugins = ["tests.infra_fixtures", "tests.s3_fixtures", "tests.zoo"]

import os

# Tests start many services on one host: each takes any free port for its /metrics (the default,
# 9400, is for pods, one service each). `lorafleet up` does the same for its children.
os.environ["LORAFLEET_METRICS_PORT"] = "0"
# The gateway's HTTP API likewise (its default, 8000, is for a person's `lorafleet up` and for pods).
os.environ["LORAFLEET_GATEWAY_PORT"] = "0"
