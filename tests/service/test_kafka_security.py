"""Kafka security settings (SASL PLAIN / SCRAM, TLS) reach every Kafka client: the arguments each
combination gives, refusals that name the variable, and proof on the wire: the embedded broker
(plaintext only) takes a plaintext producer and refuses one that opens with a SASL handshake."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from aiokafka.errors import KafkaConnectionError

from lorafleet.common.kafka import make_consumer, make_producer, security_options


def _env(**kw) -> dict[str, str]:
    return {f"LORAFLEET_KAFKA_{k.upper()}": v for k, v in kw.items()}


def test_the_arguments_of_each_combination():
    assert security_options({}) == {"security_protocol": "PLAINTEXT"}
    sasl = security_options(_env(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u",
                                 sasl_password="p"))
    assert {k: v for k, v in sasl.items() if k != "ssl_context"} == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u",
        "sasl_plain_password": "p"}
    assert isinstance(sasl["ssl_context"], ssl.SSLContext) and sasl["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    plain = security_options(_env(security_protocol="sasl_plaintext", sasl_mechanism="plain", sasl_username="u",
                                  sasl_password="p"))
    assert plain["sasl_mechanism"] == "PLAIN" and "ssl_context" not in plain
    assert isinstance(security_options(_env(security_protocol="SSL"))["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize("env,match", [
    (_env(security_protocol="TLS"), "SECURITY_PROTOCOL must be one of"),
    (_env(security_protocol="SASL_SSL", sasl_username="u", sasl_password="p"), "SASL_MECHANISM must be one of"),
    (_env(security_protocol="SASL_SSL", sasl_mechanism="GSSAPI", sasl_username="u", sasl_password="p"), "SASL_MECHANISM"),
    (_env(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u"), "SASL_PASSWORD"),
    (_env(sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p"), "SASL settings are given but"),
    (_env(ssl_cafile="/ca.pem"), "TLS files are given but"),
    (_env(security_protocol="SSL", ssl_certfile="/c.pem"), "both LORAFLEET_KAFKA_SSL_CERTFILE"),
])
def test_settings_that_do_not_fit_are_refused_by_name(env, match):
    with pytest.raises(ValueError, match=match):
        security_options(env)


async def test_producers_and_consumers_carry_them(monkeypatch):
    for k, v in _env(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256", sasl_username="u",
                     sasl_password="p").items():
        monkeypatch.setenv(k, v)
    producer, consumer = make_producer("127.0.0.1:1"), make_consumer("127.0.0.1:1", [], "g")
    for client in (producer.client, consumer._client):
        assert (client._security_protocol, client._sasl_mechanism, client._sasl_plain_username) == (
            "SASL_PLAINTEXT", "SCRAM-SHA-256", "u")
    await producer.stop()
    await consumer.stop()


async def test_on_the_wire_a_sasl_client_is_refused_by_a_plaintext_broker(kafka_bootstrap, monkeypatch):
    plain = make_producer(kafka_bootstrap)
    await asyncio.wait_for(plain.start(), 30)
    await plain.stop()
    for k, v in _env(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u",
                     sasl_password="p").items():
        monkeypatch.setenv(k, v)
    sasl = make_producer(kafka_bootstrap, request_timeout_ms=5000)
    with pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):  # the SASL handshake is refused
        await asyncio.wait_for(sasl.start(), 30)
    await sasl.stop()
