"""Durable workflows, from a third review: the public API's typing and error messages. Typed
hooks round-trip their model (aliases), a bad payload sent from outside does not kill a run,
a failed run says what the body raised, hook tokens are checked (a non-str token is never
disposed), ``define_hook`` refuses what is not a model, and finding a hook by its token does
not read the actor's whole hook history."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel, Field, ValidationError

from actors import ActorHost, define_agent_do
from tests.helpers import fast_config, place, wait_until
from tests.workflow_helpers import result_of
from triggers import _workflow
from triggers._workflow import HOOK_CREATED, HOOK_REJECTED, WAIT_CREATED
from triggers.workflows import (
    HookAlreadyResumedError,
    HookNotFoundError,
    RunFailedError,
    create_hook,
    define_hook,
    get_hook_by_token,
    resume_hook,
    sleep,
    start,
    workflow,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.contract]


async def hook_active(agent: Any, token: Any) -> None:
    async def check() -> bool:
        try:
            await get_hook_by_token(token, actor=agent)
        except HookNotFoundError:
            return False
        return True

    await wait_until(agent, check)


# -- typed hooks -----------------------------------------------------------------------------------


class Approval(BaseModel):
    user_id: str = Field(alias="userId")  # the wire name of a JSON API
    ok: bool


approval_hook = define_hook(Approval)


@workflow
async def await_approval(token: str) -> str:
    async with approval_hook.create(token=token) as hook:
        got = await hook
    return f"{got.user_id}:{got.ok}"


class Count(BaseModel):
    n: int


count_hook = define_hook(Count)


@workflow
async def await_count(token: str) -> int:
    async with count_hook.create(token=token) as hook:
        got = await hook
    return got.n


@workflow
async def body_raises() -> None:
    raise ValueError("body broke")


@workflow
async def hook_then_sleep(token: Any) -> None:
    async with create_hook(token=token) as hook:
        await hook
    await sleep("1h")


@workflow
async def await_any(token: str) -> Any:
    async with create_hook(token=token) as hook:
        return await hook


@workflow
async def holds_its_hook(token: str) -> Any:
    async with create_hook(token=token) as hook:
        got = await hook
        await sleep("1h")
    return got


@workflow
async def bare_hook(token: str) -> Any:
    return await create_hook(token=token)


@workflow
async def bad_tokens() -> list[str]:
    refused = []
    for token in ["", "a\x00b", "x" * 1025, "é" * 513, ["x"]]:
        try:
            create_hook(token=token)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            refused.append(type(exc).__name__)
    create_hook(token="é" * 512)  # 1024 bytes: the longest token
    return refused


ReviewDO = define_agent_do(
    workflows=[
        await_approval,
        await_count,
        body_raises,
        hook_then_sleep,
        await_any,
        holds_its_hook,
        bare_hook,
        bad_tokens,
    ]
)


def review_host(tmp_path: Path) -> ActorHost:
    return ActorHost(ReviewDO, **place(tmp_path), config=fast_config())


async def test_a_typed_hook_resumes_a_model_with_field_aliases(tmp_path: Path) -> None:
    """``TypedHook.resume`` validates the payload against the model, then sends
    ``model_dump(mode="json")``: field names, not aliases. The body's ``model_validate``
    expects the aliases, so a payload the model accepted fails the run ("userId: Field
    required")."""
    async with review_host(tmp_path) as h:
        agent = h.get("u:alias")
        run = await start(await_approval, ["approve:1"], actor=agent)
        await hook_active(agent, "approve:1")
        await approval_hook.resume("approve:1", {"userId": "ann", "ok": True}, actor=agent)
        assert await result_of(run) == "ann:True"


async def test_a_bad_payload_for_a_typed_hook_from_resume_hook_does_not_fail_the_run(
    tmp_path: Path,
) -> None:
    """``resume_hook`` (the untyped door, as an HTTP route would use) accepts any JSON for a
    typed hook and answers with the run id; the body's ``model_validate`` then raises and the
    whole run fails. One bad request from outside must not kill a run waiting for its
    approval: refuse the payload (ValidationError, nothing recorded) or let the hook wait on
    for a good one."""
    async with review_host(tmp_path) as h:
        agent = h.get("u:bad")
        run = await start(await_count, ["count:1"], actor=agent)
        await hook_active(agent, "count:1")
        # pydantic.ValidationError (a ValueError) would be fine: refused, nothing written.
        with contextlib.suppress(ValueError):
            await resume_hook("count:1", {"n": "not a number"}, actor=agent)
        await count_hook.resume("count:1", {"n": 3}, actor=agent)
        assert await result_of(run) == 3


async def test_resume_hook_validates_a_typed_hooks_payload_when_its_model_is_known(
    tmp_path: Path,
) -> None:
    """The hook records its model's name; where that model is defined, ``resume_hook`` (the
    untyped door) validates against it: a bad payload raises ``ValidationError`` and nothing
    is written, so the hook still takes a good one."""
    async with review_host(tmp_path) as h:
        agent = h.get("u:known")
        run = await start(await_count, ["count:k"], actor=agent)
        await hook_active(agent, "count:k")
        (created,) = await agent.events(kinds=[HOOK_CREATED])
        assert created.payload["model"] == f"{Count.__module__}.{Count.__qualname__}"
        with pytest.raises(ValidationError):
            await resume_hook("count:k", {"n": "not a number"}, actor=agent)
        assert not await agent.events(kinds=[_workflow.HOOK_RECEIVED])
        await resume_hook("count:k", {"n": 5}, actor=agent)
        assert await result_of(run) == 5


async def test_a_bad_payload_for_a_hook_whose_model_is_unknown_here_is_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed from a process that never defined the model, a bad payload is recorded; the
    body sets it aside (a ``hook_rejected`` fact says why) and waits on, and the hook takes
    the next payload."""
    monkeypatch.setattr(_workflow, "_hook_models", {})  # as in a process without the model
    async with review_host(tmp_path) as h:
        agent = h.get("u:unknown")
        run = await start(await_count, ["count:u"], actor=agent)
        await hook_active(agent, "count:u")
        await resume_hook("count:u", {"n": "not a number"}, actor=agent)

        async def rejected() -> bool:
            return bool(await agent.events(kinds=[HOOK_REJECTED]))

        await wait_until(agent, rejected)
        (fact,) = await agent.events(kinds=[HOOK_REJECTED])
        assert fact.payload["error_type"] == "ValidationError"
        await resume_hook("count:u", {"n": 4}, actor=agent)
        assert await result_of(run) == 4


async def test_a_second_resume_of_a_hook_raises_hook_already_resumed(tmp_path: Path) -> None:
    """A hook takes one payload (``await hook`` answers its first): a second resume, while
    the hook is still active, raises ``HookAlreadyResumedError`` instead of being recorded
    and ignored."""
    async with review_host(tmp_path) as h:
        agent = h.get("u:twice")
        run = await start(holds_its_hook, ["twice"], actor=agent)
        await hook_active(agent, "twice")
        await resume_hook("twice", "first", actor=agent)
        with pytest.raises(HookAlreadyResumedError) as raised:
            await resume_hook("twice", "second", actor=agent)
        assert raised.value.run_id == run.run_id
        assert len(await agent.events(kinds=[_workflow.HOOK_RECEIVED])) == 1
        assert (await get_hook_by_token("twice", actor=agent)).run_id == run.run_id
        await run.cancel("done")


# -- a failed run's error --------------------------------------------------------------------------


async def test_a_failed_run_reports_the_type_of_the_error_the_body_raised(tmp_path: Path) -> None:
    """``RunFailedError.failure`` is "the recorded failure (error type, message, ...)". The
    body raised ValueError, but the failure records the framework's wrapper: error_type
    ``FatalError``, message ``"ValueError: body broke"``; code that branches on the error type
    cannot."""
    async with review_host(tmp_path) as h:
        run = await start(body_raises, actor=h.get("u:fail"))
        with pytest.raises(RunFailedError) as raised:
            await result_of(run)
        assert raised.value.failure.error_type == "ValueError"
        assert raised.value.failure.message == "body broke"


# -- hook tokens -----------------------------------------------------------------------------------


async def test_a_hook_with_a_non_str_token_is_released_when_its_block_ends(tmp_path: Path) -> None:
    """``create_hook(token=5)`` is accepted (no TypeError) and recorded as the int 5. The
    replay reads it back as ``str(fact["token"])``, so the hook's disposal records the token
    "5", which never matches the int: the hook stays active while its run lives (found by
    ``get_hook_by_token(5)``, conflicting with any other creator). Refusing a non-str token,
    or keeping it as recorded, would both free it."""
    async with review_host(tmp_path) as h:
        agent = h.get("u:token")
        run = await start(hook_then_sleep, [5], actor=agent)

        async def created_or_ended() -> bool:
            ended = (await run.status()).terminal
            return ended or bool(await agent.events(kinds=[HOOK_CREATED]))

        await wait_until(agent, created_or_ended)
        if not (await run.status()).terminal:
            await resume_hook(5, None, actor=agent)  # type: ignore[arg-type]

            async def asleep_or_ended() -> bool:
                ended = (await run.status()).terminal
                return ended or bool(await agent.events(kinds=[WAIT_CREATED]))

            await wait_until(agent, asleep_or_ended)
        with pytest.raises(HookNotFoundError):
            await get_hook_by_token(5, actor=agent)  # type: ignore[arg-type]


async def test_hook_tokens_are_non_empty_text_without_nul_of_at_most_1_kb(
    tmp_path: Path,
) -> None:
    """``create_hook`` refuses an empty token, a NUL, more than 1024 UTF-8 bytes
    (``ValueError``) and a token that is not a str (``TypeError``), before it takes a place in
    the run."""
    async with review_host(tmp_path) as h:
        run = await start(bad_tokens, actor=h.get("u:tokens"))
        assert await result_of(run) == ["ValueError"] * 4 + ["TypeError"]


async def test_a_run_that_ends_drops_the_index_rows_of_its_hooks(tmp_path: Path) -> None:
    """A hook the body never disposed of is released when its run ends: its row in the
    actor's hook index is dropped in the transaction that ends the run."""
    async with review_host(tmp_path) as h:
        agent = h.get("u:bare")
        run = await start(bare_hook, ["bare"], actor=agent)
        await hook_active(agent, "bare")
        await resume_hook("bare", "done", actor=agent)
        assert await result_of(run) == "done"
        row = await agent._ledger_op(lambda tx: _workflow._hook_row(tx, "bare"), write=False)
        assert row is None


def test_define_hook_refuses_what_is_not_a_pydantic_model() -> None:
    """``define_hook(int)`` is accepted; the mistake shows up only inside a run, as an
    AttributeError (``int`` has no ``model_validate``) that fails it, or at ``.resume``."""
    with pytest.raises(TypeError):
        define_hook(int)  # type: ignore[type-var]


# -- finding a hook by its token ---------------------------------------------------------------


async def _rows_read_by_one_lookup(tmp_path: Path, past: int, monkeypatch: Any) -> int:
    async with review_host(tmp_path / str(past)) as h:
        agent = h.get(f"u:scan{past}")
        for i in range(past):
            old = await start(await_any, [f"old:{i}"], actor=agent)
            await hook_active(agent, f"old:{i}")
            await resume_hook(f"old:{i}", i, actor=agent)
            await result_of(old)
        run = await start(await_any, ["new"], actor=agent)
        await hook_active(agent, "new")

        rows = Counter[str]()
        store_type = type(h.store)
        original = store_type.run

        class CountingTx:
            def __init__(self, tx: Any) -> None:
                self._tx = tx

            def events(self, *args: Any, **kwargs: Any) -> Any:
                found = self._tx.events(*args, **kwargs)
                rows["events"] += len(found)
                return found

            def __getattr__(self, name: str) -> Any:
                return getattr(self._tx, name)

        async def counted(self: Any, actor_id: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
            return await original(self, actor_id, lambda tx: fn(CountingTx(tx)), *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(store_type, "run", counted)
            await get_hook_by_token("new", actor=agent)
        await resume_hook("new", 0, actor=agent)
        await result_of(run)
        return rows["events"]


async def test_finding_a_hook_by_token_does_not_read_every_past_hook_of_the_actor(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """``active_hook_id`` reads every ``hook_created``/``hook_disposed`` fact the actor ever
    recorded, for each ``get_hook_by_token``, ``resume_hook`` and hook creation: a long-lived
    actor (a user approving things for years) pays for its whole history on every resume,
    quadratic over its life. The lookup should cost the same after 40 finished hooks as
    after 5."""
    few = await _rows_read_by_one_lookup(tmp_path, 5, monkeypatch)
    many = await _rows_read_by_one_lookup(tmp_path, 40, monkeypatch)
    assert many <= few, f"one lookup read {few} rows after 5 past hooks, {many} after 40"
