"""Client-chosen job ids against a real redis-server: no id names another key, no script half-writes.

The probe's repro (issue 17, item 1): job `P1:events` made a hash at the key job `P1` used for its
event stream, and `submit.lua` then failed halfway through `P1`'s writes. These tests hold the
mechanism: the key layout is injective whatever the id holds, every script checks key types before
its first write, a job whose keys something else wrote is dead-lettered instead of crash-looping its
replica, and a job whose attempts all die is dead-lettered even when its deadline passed meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from redis.exceptions import ResponseError

from blockpress.runtime.contracts.jobs import JobSpec, JobState
from blockpress.runtime.contracts.keys import GROUP, Keys
from blockpress.runtime.gateway.validation import SubmitIn
from blockpress.runtime.queue.jobqueue import JobQueue

MODEL = "tiny"
KEYS = Keys()
JOB_KINDS = ("job", "events", "ledger")
MODEL_KINDS = ("queue", "queued", "deadlines", "dead_letter", "replicas")
SUFFIXES = [":events", ":ledger", ":job", ":queue", "\n", ":", "::events", "}", "{bp}"]


def spec(job_id: str, **fields: Any) -> JobSpec:
    return JobSpec(job_id=job_id, model=MODEL, prompt=f"prompt of {job_id!r}", **fields)


def all_keys(keys: Keys, name: str) -> dict[str, str]:
    kinds = JOB_KINDS + MODEL_KINDS
    return {getattr(keys, kind)(name): kind for kind in kinds}


@given(st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=6, unique=True))
def test_no_two_ids_or_kinds_share_a_key(names: list[str]) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for name in names:
        for key, kind in all_keys(KEYS, name).items():
            assert key not in seen, f"{kind}({name!r}) == {seen.get(key)}: {key!r}"
            seen[key] = (kind, name)
            assert key.startswith("{bp}:"), "one hash tag: every script's keys are in one cluster slot"


@pytest.mark.parametrize("suffix", SUFFIXES)
async def test_an_id_with_a_key_suffix_is_a_job_of_its_own(redis_client: Any, suffix: str) -> None:
    queue = JobQueue(redis_client)
    for job_id in (f"P1{suffix}", "P1", f"{suffix}P1"):
        _record, created = await queue.submit(spec(job_id))
        assert created, f"{job_id!r} is a new job"
    for job_id in (f"P1{suffix}", "P1", f"{suffix}P1"):
        record = await queue.get(job_id)
        assert record.state is JobState.QUEUED and record.spec.job_id == job_id
        assert [e.type for e in await queue.read_events(job_id)] == ["queued"]
    assert await queue.depth(MODEL) == 3
    for _ in range(3):
        claim = await queue.claim(MODEL, "r1", block_ms=200)
        assert claim is not None
        assert await queue.finish(claim, JobState.SUCCEEDED, result={"text": claim.job_id})
    for job_id in (f"P1{suffix}", "P1", f"{suffix}P1"):
        assert (await queue.get(job_id)).result == {"text": job_id}


@pytest.mark.parametrize(
    "job_id", ["P1:events", "job\n", "a b", "", "x" * 129, "é", "a/b", "a{b}", "P1\r", "\nP1", "a\x00"]
)
def test_the_gateway_refuses_ids_outside_the_alphabet(job_id: str) -> None:
    if not job_id:
        assert SubmitIn(job_id="").job_id == "", "empty: the gateway picks one"
        return
    with pytest.raises(ValidationError, match="job_id"):
        SubmitIn(job_id=job_id)


@pytest.mark.parametrize("job_id", ["P1", "a.b-c_d", "0" * 128, "f" * 32])
def test_the_gateway_takes_ids_inside_the_alphabet(job_id: str) -> None:
    assert SubmitIn(job_id=job_id).job_id == job_id


@pytest.mark.parametrize(
    ("kind", "clobber"),
    list(itertools.product(["job", "events", "queue", "queued", "deadlines", "dead_letter"], ["string", "list"])),
)
async def test_a_foreign_key_of_the_wrong_type_makes_submit_write_nothing(
    redis_client: Any, kind: str, clobber: str
) -> None:
    queue = JobQueue(redis_client)
    key = getattr(KEYS, kind)("J" if kind in JOB_KINDS else MODEL)
    if clobber == "string":
        await redis_client.set(key, "not ours")
    else:
        await redis_client.rpush(key, "not ours")
    before = sorted(await redis_client.keys("*"))
    with pytest.raises(ResponseError, match="BPKEYTYPE"):
        await queue.submit(spec("J", deadline=time.time() + 60))
    assert sorted(await redis_client.keys("*")) == before, "nothing half-written"


async def test_a_job_whose_keys_were_clobbered_is_dead_lettered_not_crash_looped(redis_client: Any) -> None:
    queue = JobQueue(redis_client, lease_s=0.2)
    await queue.submit(spec("victim"))
    await queue.submit(spec("next"))
    await redis_client.delete(KEYS.events("victim"))
    await redis_client.set(KEYS.events("victim"), "clobbered")
    claim = await queue.claim(MODEL, "r1", block_ms=500)
    assert claim is not None and claim.job_id == "next", "the replica goes on with the next job"
    dead = await redis_client.xrange(KEYS.dead_letter(MODEL))
    assert [fields[b"job"] for _, fields in dead] == [b"victim"]
    assert b"holds a string" in dead[0][1][b"error"]
    assert await queue.depth(MODEL) == 0
    pending = await redis_client.xpending(KEYS.queue(MODEL), GROUP)
    assert pending["pending"] == 1, "only `next` is pending"


@pytest.mark.parametrize("deadline_in_s", [None, 0.3])
async def test_a_job_whose_every_attempt_dies_is_dead_lettered_even_past_its_deadline(
    redis_client: Any, deadline_in_s: float | None
) -> None:
    # A replica that os._exit()s mid-job just stops heartbeating: the queue only sees leases lapse.
    queue = JobQueue(redis_client, lease_s=0.2, max_deliveries=2)
    deadline = None if deadline_in_s is None else time.time() + deadline_in_s
    await queue.submit(spec("poison", deadline=deadline))
    attempts = []
    give_up = time.monotonic() + 10
    while (record := await queue.get("poison")).state is not JobState.DEAD_LETTERED:
        assert time.monotonic() < give_up, record
        claim = await queue.claim(MODEL, "r1", block_ms=300)
        if claim is not None:
            attempts.append(claim.attempt)  # ... and the replica dies without a word
        await asyncio.sleep(0.25)
    assert attempts == [1, 2]
    assert record.error is not None and record.error["code"] == "WORKER_LOST"
    events = await queue.read_events("poison")
    assert [e.type for e in events if e.is_final] == ["dead_lettered"]
    assert [f[b"job"] for _, f in await redis_client.xrange(KEYS.dead_letter(MODEL))] == [b"poison"]
