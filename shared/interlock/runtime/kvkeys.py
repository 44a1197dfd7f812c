"""Keys of a KV bucket that match a subject pattern.

``KeyValue.keys(filters=…)`` in nats-py matches filters as substrings of every key, after reading
all of them; a watch on the pattern reads only the matching keys, and ``*``/``>`` mean what they
mean in subjects (``acme.*`` is not ``acme.llm.summarize``).
"""

from __future__ import annotations

from nats.js.kv import KeyValue


async def matching_keys(kv: KeyValue, pattern: str) -> list[str]:
    """The keys (not deleted) that match ``pattern``, sorted."""
    watcher = await kv.watch(pattern, ignore_deletes=True, meta_only=True)
    keys: list[str] = []
    try:
        async for entry in watcher:
            if entry is None:  # the end of what is there now
                break
            keys.append(entry.key)
    finally:
        await watcher.stop()
    return sorted(keys)
