"""`OpenGate`: the gate of a gateway without a store - no keys, no limits, one anonymous principal, nothing recorded.

It is the loopback default (`scripts/gateway.py` without `--keys_required`) and what front-door tests build on. A
gateway that binds a non-loopback address must run a gate that checks keys (`StoreGate`).
"""

from __future__ import annotations

import time
import uuid

from gateway.gate import Outcome, PreparedRequest, Principal, Ticket

ANONYMOUS = Principal(key_id="anonymous", user_id="anonymous", anonymous=True)


class OpenGate:
    """Every caller is `ANONYMOUS`; requests pass unchanged; nothing is limited or recorded."""

    def authenticate(self, secret: str | None, client_address: str | None) -> Principal:
        return ANONYMOUS

    def prepare(self, principal: Principal, request: PreparedRequest) -> PreparedRequest:
        return request

    def admit(self, principal: Principal, prepared: PreparedRequest, prompt_tokens: int) -> Ticket:
        reserved = prepared.n * (prompt_tokens + int(prepared.sampling.get("max_tokens") or 0))
        return Ticket(uuid.uuid4().hex, principal, prepared, reserved_tokens=reserved, started=time.time())

    def finish(self, ticket: Ticket, outcome: Outcome) -> None:
        pass

    def feedback(
        self, principal: Principal, request_id: str, rating: int, comment: str | None, tags: list[str]
    ) -> None:
        pass
