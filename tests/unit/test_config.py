"""Flags and their defaults: every default is the dataclass's, and every timeout is a flag."""

from __future__ import annotations

import dataclasses

from epdserve.config import PlaneTimeouts, TransferTimeouts, parse_frontend_args, parse_worker_args

WORKER = ["--model", "m"]


def test_parser_defaults_are_the_dataclass_defaults():
    config = parse_worker_args(WORKER, {})
    assert config.runtime.plane == PlaneTimeouts() and config.transfer == TransferTimeouts()
    for field in dataclasses.fields(config):
        if field.default is not dataclasses.MISSING:
            assert getattr(config, field.name) == field.default, field.name


def test_every_timeout_is_a_flag():
    config = parse_worker_args(
        [*WORKER, "--heartbeat-interval", "0.5", "--drain-timeout", "2", "--kv-handoff-timeout", "7",
         "--nixl-read-timeout", "3", "--mailbox-ttl", "4"],
        {},
    )
    assert config.runtime.plane.heartbeat_interval == 0.5 and config.runtime.plane.dead_server_timeout == 1.5
    assert config.runtime.plane.drain_timeout == 2
    assert (config.transfer.kv_handoff_timeout, config.transfer.read_timeout, config.transfer.mailbox_ttl) == (7, 3, 4)
    assert parse_frontend_args(["--request-ack-timeout", "1"], {}).runtime.plane.ack_timeout == 1


def test_kernel_cache_dir_follows_xdg_cache_home():
    config = parse_worker_args(WORKER, {"XDG_CACHE_HOME": "/cache"})
    assert config.kernel_cache_dir == "/cache/epdserve/kernels"
