# Shared pytest fixtures for every test folder: a real Kafka-protocol broker and redis-server,
# a real S3 HTTP server, and the tiny models/adapters with their HF PEFT reference.
pytest_plugins = ["tests.infra_fixtures", "tests.s3_fixtures", "tests.zoo"]
