"""How fast the work of a dead process comes back: ack waits, progress acks, redelivery limits.

Every durable consumer (a service's and a worker's) holds each message un-acked while it works on
it and sends a progress ack (``+WPI``) for it every :data:`PROGRESS_INTERVAL_S`; the server
redelivers a message to another copy once :data:`ACK_WAIT_S` passes without an ack or a progress
ack. A live holder thus keeps its work however long it takes, and a killed one (SIGKILL, a lost
machine) loses it to another copy within ``ACK_WAIT_S``: it counts as dead after
``ACK_WAIT_S / PROGRESS_INTERVAL_S`` missed progress acks. A worker in another language must
follow the same numbers (contracts/README.md, "Timing").
"""

from __future__ import annotations

ACK_WAIT_S = 1.5
"""The ``ack_wait`` of every service consumer and of every worker's job consumer."""

PROGRESS_INTERVAL_S = 0.5
"""How often a holder sends a progress ack for each message it still works on (a third of the ack
wait: two can be lost or late before the message is redelivered)."""

JOB_MAX_DELIVER = 5
"""Deliveries of one job message at most (the job consumer's ``max_deliver``): a job that kills
every worker that takes it stops coming back; its attempt then ends by its lease or deadline and
the retry policy decides (a new attempt is a new message)."""

POLICY_REQUEST_TIMEOUT_S = 0.5
"""How long the planner waits for the policy service's answer to a decision request
(``subjects.policy_decide``) before it appends the ready steps alone (the policy service then
decides them from its consumer). A policy service that is down answers at once (no responders)."""

POLICY_REQUEST_PAUSE_S = 1.0
"""After a request timed out, the planner asks no more for this long (each would wait the whole timeout)."""
