"""The auditor: a query projection of every run's event log, rebuilt by replay at will."""

from interlock.auditor.projection import ApplyResult, Projection, RebuildStats
from interlock.auditor.service import AuditorService

__all__ = ["ApplyResult", "AuditorService", "Projection", "RebuildStats"]
