"""Whether a Cadenza process exports traces, for the engine and tools built on the SDK.

Agent authors need none of this (`Agent` sets tracing up itself). It is public so that
the engine reads the standard OpenTelemetry variables by the very rule agents use, rather
than a copy that drifts. The implementation lives in the SDK's private `_tracing`; this
module is its public face. docs/tracing.md says what is traced.
"""

from __future__ import annotations

from ._tracing import enabled

__all__ = ["enabled"]
