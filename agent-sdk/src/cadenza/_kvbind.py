"""A KV bucket bound without asking for its stream's info.

`js.key_value(bucket)` asks `$JS.API.STREAM.INFO.KV_<bucket>` first. A credential allowed
that request may also ask it with a `subjects_filter` in the body, which lists every key
of the bucket: another namespace's run ids, task ids, Model names. A permission names the
request's subject, not its body, so an agent credential is not allowed STREAM.INFO on the
buckets it shares with other namespaces, and binds them here instead: direct gets on the
key's subject, writes on the key's subject, as `js.key_value` would bind a bucket the
engine created with `allow_direct` (engine/infra.py creates every bucket an agent uses).
"""

from __future__ import annotations

from typing import Any


def bind(js: Any, bucket: str) -> Any:
    """nats-py's KeyValue for `bucket`, with no request made."""
    from nats.js.kv import KeyValue

    return KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=js, direct=True)
