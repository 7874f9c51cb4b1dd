"""Read a text/event-stream response in tests (bounded waits)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass
class Message:
    event: str  # the event name; "comment" for a comment line such as the keep-alive
    data: Any  # the decoded JSON data; the comment text for comments
    retry: int | None = None


class EventReader:
    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response

    async def next(self, timeout: float = 5.0) -> Message:
        """The next event or comment; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            event, data, retry = "message", [], None
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("the event stream ended")
                line = raw.decode().rstrip("\n")
                if line.startswith(":"):
                    return Message("comment", line[1:].strip())
                if line == "":
                    if data:
                        return Message(event, json.loads("\n".join(data)), retry)
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
                elif field == "retry":
                    retry = int(value)

    async def next_event(self, timeout: float = 5.0) -> Message:
        """The next event, skipping comments."""
        async with asyncio.timeout(timeout):
            while (message := await self.next(timeout)).event == "comment":
                pass
            return message
