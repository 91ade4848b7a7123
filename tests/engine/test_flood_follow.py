"""
A flood followed from the start arrives whole, once, in order, on every
engine: Podman 4.3 stamps the pieces of a line written in parts inside it
(``PodmanEngine`` joins them, ``join_partials``), which lost about one line
in 1 500 of a flood before.
"""

from __future__ import annotations

import pytest_twisted

from tests.engine.test_behaviour import Harness, engine, within  # noqa: F401 - a fixture

LINES = 20_000


@pytest_twisted.ensureDeferred
async def test_a_flood_followed_from_the_start_arrives_whole_and_in_order(
    engine: Harness,  # noqa: F811
) -> None:
    e = engine.engine
    cid = await e.create(engine.spec({"FLOOD_LINES": str(LINES), "STARTUP_DELAY": "0"},
                                     output_max_bytes=64 * 1024 * 1024))
    await e.start(cid)
    numbers: list[int] = []
    stamps: list[int] = []

    async def follow() -> None:
        stream = e.output(cid, follow=True)
        try:
            async for batch in stream.batches():
                for line in batch:
                    stamps.append(line.ns)
                    if line.text.isdigit():
                        numbers.append(int(line.text))
                    if line.text == "flood done":
                        return
        finally:
            stream.close()

    await within(120, follow())
    assert numbers == list(range(1, LINES + 1))
    assert stamps == sorted(set(stamps))  # every line its own, increasing identity
