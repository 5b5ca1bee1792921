import time

import pytest

from vmreplica.domain.relationship import Relationship
from vmreplica.errors import UsageError
from vmreplica.service import trust
from vmreplica.service.home import parse_address, validate_host_name
from vmreplica.service.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "state.db")
    yield s
    s.close()


def test_relationship_round_trip(store):
    store.add_relationship(Relationship(vm="a", id="x" * 32, role="primary", peer="r",
                                        state="ready_for_initial", disks=["disk0"]))
    rel = store.relationship("a")
    assert rel.disks == ["disk0"] and rel.bitmap is None
    store.set_state("a", "initial_in_progress", bitmap="b1", cycle=3)
    rel = store.relationship("a")
    assert (rel.state, rel.bitmap, rel.cycle) == ("initial_in_progress", "b1", 3)
    store.remove_relationship("a")
    assert store.relationship("a") is None


def test_token_is_single_use(store):
    store.add_token("id1", "h", time.time() + 60)
    assert store.use_token("id1")["used_at"] is None
    assert store.use_token("id1")["used_at"] is not None
    assert store.use_token("nope") is None


def test_transaction_rolls_back(store):
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.set_setting("k", 1)
            raise RuntimeError
    assert store.get_setting("k") is None


def test_token_parsing():
    with pytest.raises(UsageError, match="not a vmreplica pairing token"):
        trust.parse_token("hello")
    with pytest.raises(UsageError, match="damaged"):
        trust.parse_token("vmr1-AAAA")
    import base64
    raw = bytes(range(6)) + bytes(16) + bytes(range(32))
    tid, secret, fp = trust.parse_token("vmr1-" + base64.urlsafe_b64encode(raw).decode().rstrip("="))
    assert tid == raw[:6].hex() and secret == bytes(16) and fp == "sha256:" + raw[22:].hex()


def test_addresses_and_names():
    assert parse_address("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_address("[::1]:9000") == ("::1", 9000)
    assert parse_address("host") == ("host", 8443)
    for bad in ("", "a:b", "h:99999"):
        with pytest.raises(UsageError):
            parse_address(bad)
    assert validate_host_name("Site-A.example.com") == "site-a.example.com"
    with pytest.raises(UsageError):
        validate_host_name("bad_name")
