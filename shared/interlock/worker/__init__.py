"""The worker SDK: run agent code as Interlock jobs.

    from interlock.worker import Worker, JobContext, FatalError

    worker = Worker("triage")

    @worker.job("incident.classify", version="2", capabilities=["llm"])
    async def classify(ctx: JobContext) -> dict:
        await ctx.heartbeat("reading the alert")
        return {"severity": "high"}

Run it with ``interlock worker mymodule:worker``.
"""

from interlock.worker._errors import FatalError, RetryableError
from interlock.worker._worker import JobContext, JobHandler, Worker

__all__ = ["FatalError", "JobContext", "JobHandler", "RetryableError", "Worker"]
