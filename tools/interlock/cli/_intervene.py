"""Intervening in a run and feedback on step outputs (issue 17):
``interlock step retry|skip``, ``interlock run resume|pause|unpause`` and
``interlock feedback RUN STEP | list RUN | export --workflow W``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from interlock.cli._common import DefaultGroup, connected, fail, with_globals
from interlock.cli._output import Column, Format, OutputOption, columns, echo, emit_rows, hash_column
from interlock.cli._run import parse_input
from interlock.client import Client
from interlock.contracts.messages import CommandReply
from interlock.core.codec import canonical_json

RunArg = Annotated[str, typer.Argument(metavar="RUN", help="run id")]
StepArg = Annotated[str, typer.Argument(metavar="STEP", help="step id (a for_each item: STEP[INDEX])")]
ReasonOption = Annotated[str, typer.Option("--reason",
                                           help="why (required): recorded in the run's log with who you are")]
WaitOption = Annotated[bool, typer.Option("--wait", help="then print each event until the run ends again; exit 0 "
                                                         "only if it succeeded")]
TimeoutOption = Annotated[float | None, typer.Option(
    "--timeout", metavar="SECONDS", min=0, help="with --wait: give up (exit 1) after SECONDS")]

step = typer.Typer(no_args_is_help=True, help="Intervene in a step of a run: retry it now, or skip it with an output.")


class FeedbackGroup(DefaultGroup):
    """``interlock feedback RUN STEP …`` gives feedback (``feedback give``)."""

    default_command = "give"


feedback = typer.Typer(cls=FeedbackGroup, no_args_is_help=True,
                       help="Rate or correct a step's output; list and export the feedback for evaluation. "
                            "`interlock feedback RUN STEP …` is short for `interlock feedback give RUN STEP …`.")


def _reason(reason: str) -> str:
    if not reason.strip():
        fail("--reason: say why (it is recorded in the run's log)")
    return reason


def _act(ctx: typer.Context, run: str, act: Any, done: str, *, wait: bool, timeout: float | None) -> None:
    """Send the act; print ``done``; with ``wait``, follow the run to its next end."""

    async def work(client: Client) -> int:
        seq = 0
        if wait:  # a terminal event already in the log (a failed run resumed) does not end the wait
            commits = await client.read_commits(run)
            seq = max((int(e["seq"]) for c in commits for e in c.envelopes), default=0)
        reply: CommandReply = await act(client)
        detail = reply.detail if isinstance(reply.detail, dict) else {}
        echo(done.format(**{k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in detail.items()}))
        if not wait:
            return 0
        final = await client.wait(run, timeout=timeout, after_seq=seq)
        echo(f"run {run}: {final}")
        return 0 if final == "RunSucceeded" else 1

    raise typer.Exit(connected(ctx, work))


@step.command("retry")
@with_globals
def retry(
    ctx: typer.Context,
    run: RunArg,
    step_id: StepArg,
    reason: ReasonOption = "",
    input: Annotated[str | None, typer.Option(
        "--input", metavar="JSON|@FILE", help="retry with this input instead (JSON, or @file): its job hash is "
                                              "recomputed, so policy and approvals decide again")] = None,
    wait: WaitOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """Retry a failed, timed-out or waiting step now (a failed run goes on, same run id)."""
    why = _reason(reason)
    patch = parse_input(input) if input is not None else None

    def act(client: Client) -> Any:
        if input is None:
            return client.retry_step(run, step_id, reason=why)
        return client.retry_step(run, step_id, reason=why, input=patch)

    _act(ctx, run, act, f"step {step_id} of run {run} retried{' with the new input' if input else ''} "
                        "(job hash {job_hash})", wait=wait, timeout=timeout)


@step.command("skip")
@with_globals
def skip(
    ctx: typer.Context,
    run: RunArg,
    step_id: StepArg,
    output: Annotated[str, typer.Option("--output", metavar="JSON|@FILE",
                                        help="the step's output (JSON, or @file): what its dependants see")],
    reason: ReasonOption = "",
    wait: WaitOption = False,
    timeout: TimeoutOption = None,
) -> None:
    """Complete a step with a supplied output, so its dependants proceed."""
    why = _reason(reason)
    value = parse_input(output, "--output")
    _act(ctx, run, lambda client: client.skip_step(run, step_id, output=value, reason=why),
         f"step {step_id} of run {run} skipped with the supplied output", wait=wait, timeout=timeout)


def resume(ctx: typer.Context, run: RunArg, reason: ReasonOption = "", wait: WaitOption = False,
           timeout: TimeoutOption = None) -> None:
    """Resume a failed run from its failed steps: the same run goes on (no new run)."""
    why = _reason(reason)
    _act(ctx, run, lambda client: client.resume_run(run, reason=why),
         "run {run_id} resumed: retrying {steps}", wait=wait, timeout=timeout)


def pause(ctx: typer.Context, run: RunArg, reason: ReasonOption = "") -> None:
    """Pause dispatching: jobs already out finish, nothing new is dispatched until `run unpause`."""
    why = _reason(reason)
    _act(ctx, run, lambda client: client.pause_run(run, reason=why), "run {run_id} paused", wait=False, timeout=None)


def unpause(ctx: typer.Context, run: RunArg, reason: ReasonOption = "", wait: WaitOption = False,
            timeout: TimeoutOption = None) -> None:
    """Dispatch a paused run's jobs again."""
    why = _reason(reason)
    _act(ctx, run, lambda client: client.unpause_run(run, reason=why), "run {run_id} unpaused", wait=wait,
         timeout=timeout)


def register(run_app: typer.Typer) -> None:
    """``interlock run resume|pause|unpause``."""
    run_app.command("resume")(with_globals(resume))
    run_app.command("pause")(with_globals(pause))
    run_app.command("unpause")(with_globals(unpause))


FEEDBACK_COLUMNS = columns("at", "run_id", "step_id", "by", "score", Column("note", "NOTE"),
                           hash_column("output_hash", "OUTPUT"))


@feedback.command("give")
@with_globals
def give(
    ctx: typer.Context,
    run: RunArg,
    step_id: StepArg,
    score: Annotated[float | None, typer.Option("--score", help="your rating of the output (a number)")] = None,
    correction: Annotated[str | None, typer.Option(
        "--correction", metavar="JSON|@FILE", help="the output as it should have been (JSON, or @file)")] = None,
    note: Annotated[str, typer.Option("--note", help="a comment")] = "",
    output_hash: Annotated[str | None, typer.Option(
        "--output-hash", metavar="SHA256", help="refuse unless the step's output is this one")] = None,
) -> None:
    """Rate or correct a step's output: recorded in the run's log, bound to the output's hash."""
    if score is None and correction is None and not note.strip():
        fail("give --score, --correction or --note")

    def act(client: Client) -> Any:
        if correction is None:
            return client.give_feedback(run, step_id, score=score, note=note, output_hash=output_hash)
        return client.give_feedback(run, step_id, score=score, note=note, output_hash=output_hash,
                                    correction=parse_input(correction, "--correction"))

    _act(ctx, run, act, f"feedback on step {step_id} of run {run} recorded (output {{output_hash}})", wait=False,
         timeout=None)


@feedback.command("list")
@with_globals
def list_feedback(ctx: typer.Context, run: RunArg, output: OutputOption = Format.table) -> None:
    """The feedback on a run's step outputs, oldest first (from the auditor)."""
    emit_rows(connected(ctx, lambda client: client.feedback(run_id=run)), output, FEEDBACK_COLUMNS)


@feedback.command("export")
@with_globals
def export(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Option("--workflow", metavar="WORKFLOW", help="the workflow's runs")],
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many rows")] = 100_000,
) -> None:
    """A workflow's feedback as JSON lines, for evaluation.

    One object per line: run, step, attempt, the output and its hash, score, correction, note,
    who and when."""
    rows = connected(ctx, lambda client: client.feedback(workflow_id=workflow, limit=limit))
    for row in rows:
        echo(canonical_json(row).decode())


__all__ = ["feedback", "register", "step"]
