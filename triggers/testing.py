"""Unit-test your own triggers without a host: :class:`TriggerEnvironment`.

The environment runs one trigger's functions the way the host does, against an in-memory
ledger: ``acquire`` gets a real :class:`~triggers.TriggerContext` whose signal the test can
abort, whose stream the test can read, and whose ``events()`` read what the test seeded; the
commit functions get a real :class:`~triggers.Tx` and their facts come back as events.

::

    from triggers.testing import TriggerEnvironment

    async def test_summarize_stops_on_cancel():
        env = TriggerEnvironment(summarize_trigger, bindings={"llm": FakeLLM()})
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_after_first_chunk, env)
            with pytest.raises(AbortError):
                await env.acquire({"text": "..."})
        assert env.streamed == ["partial summary"]
        facts = env.commit_cancelled(reason="user")
        assert [f.kind for f in facts] == ["summary.cancelled"]

    async def cancel_after_first_chunk(env):
        await env.wait_streamed(1)
        env.cancel("user")

Retries, leases, timeouts and the choice of which commit runs are the scheduler's: test
those end to end with a real ``ActorHost`` on a temporary directory.
"""

from ._testing import TriggerEnvironment as TriggerEnvironment

__all__ = ["TriggerEnvironment"]
