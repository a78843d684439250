"""The router's replica choice, without servers: least outstanding tokens, and the prefix-aware variant."""

from __future__ import annotations

import pytest

from scalellm.router.config import DEFAULT_MAX_TOKENS, ReplicaAddress, RouterConfig
from scalellm.router.dispatch import Job
from scalellm.router.policy import Load, Policy, prefix_hashes


def test_a_jobs_cost_is_its_prompt_and_every_token_its_sequences_may_generate() -> None:
    prompt = "x" * 400  # estimated: 400 characters / 4 + 1
    assert Job.of(prompt, 64).cost == 101 + 64
    assert Job.of(prompt, 64, n=3).cost == 101 + 3 * 64
    assert Job.of(prompt, 64, n=2, prompt_tokens=10).cost == 10 + 2 * 64  # the OpenAI door counts its tokens
    for refused in (None, 0, -5, "64", 2.5, True):  # the replica refuses (or defaults) these; the load uses defaults
        assert Job.of(prompt, refused, n=refused).cost == 101 + DEFAULT_MAX_TOKENS


def test_least_outstanding_tokens_wins_and_ties_take_turns() -> None:
    policy = Policy()
    loads = [Load("a", outstanding_tokens=500), Load("b", outstanding_tokens=100), Load("c", outstanding_tokens=900)]
    assert {policy.choose(loads, [0, 1, 2], "x").index for _ in range(6)} == {1}
    even = [Load("a"), Load("b")]
    picks = [policy.choose(even, [0, 1], "x").index for _ in range(10)]
    assert picks.count(0) == picks.count(1) == 5
    assert policy.choose(loads, [0, 2], "x").index == 0  # only the candidates (healthy, not tried) count


def test_prefix_policy_follows_the_replica_that_holds_the_prefix() -> None:
    policy = Policy(prefix_aware=True, chunk_chars=8, balance_tokens=100)
    loads = [Load("a"), Load("b")]
    system = "You are a helpful assistant. " * 4
    first = policy.choose(loads, [0, 1], system + "Question one?")
    for question in ("Question two?", "Question three, a longer one?"):
        again = policy.choose(loads, [0, 1], system + question)
        assert again.index == first.index and again.by_prefix
    other = policy.choose(loads, [0, 1], "A different conversation altogether, nothing shared.")
    assert not other.by_prefix


def test_prefix_policy_gives_way_when_the_load_gap_is_too_big() -> None:
    policy = Policy(prefix_aware=True, chunk_chars=8, balance_tokens=100)
    loads = [Load("a"), Load("b")]
    prompt = "Shared system prompt for everyone. " * 3
    holder = policy.choose(loads, [0, 1], prompt).index
    loads[holder].outstanding_tokens = 1000
    assert policy.choose(loads, [0, 1], prompt + "more").index != holder


def test_prefix_hashes_name_whole_prefixes() -> None:
    a, b = prefix_hashes("abcdefgh" * 3, 8), prefix_hashes("abcdefgh" * 2 + "XXXXXXXX", 8)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert prefix_hashes("short", 8) == []


def test_replica_address_and_config_are_checked() -> None:
    address = ReplicaAddress.parse("replica-1:8000:8001")
    assert (address.http_url, address.grpc_target) == ("http://replica-1:8000", "replica-1:8001")
    for bad in ("replica-1:8000", "replica:x:8001", ":8000:8001"):
        with pytest.raises(ValueError, match="HOST:HTTP_PORT:GRPC_PORT"):
            ReplicaAddress.parse(bad)
    with pytest.raises(ValueError, match="policy"):
        RouterConfig(replicas=(address,), policy="random")
    with pytest.raises(ValueError, match="replica"):
        RouterConfig(replicas=())


def test_replica_dns_needs_no_static_replica_and_addresses_found_may_be_ipv6() -> None:
    name = ReplicaAddress.parse("scalellm-replicas:8000:8001")
    assert RouterConfig(replica_dns=(name,)).replica_dns == (name,)
    with pytest.raises(ValueError, match="dns_interval_s"):
        RouterConfig(replica_dns=(name,), dns_interval_s=0)
    v6 = ReplicaAddress("fd00::5", 8000, 8001)
    assert (v6.http_url, v6.grpc_target, v6.name) == ("http://[fd00::5]:8000", "[fd00::5]:8001", "[fd00::5]:8000")
