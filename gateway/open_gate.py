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

    def is_operator(self, principal: Principal) -> bool:
        """Everyone may open the operator pages of an open (loopback, keyless) gateway."""
        return True

    # Nothing above blocks, so the front doors may call it on the event loop (see gateway/gate.py); a subclass that
    # overrides a method (and may block in it) gets the worker thread for that method unless it overrides the
    # `_nowait` one too.

    def _own(self, method: str) -> bool:
        return getattr(type(self), method) is getattr(OpenGate, method)

    def authenticate_nowait(self, secret: str | None, client_address: str | None) -> Principal | None:
        return self.authenticate(secret, client_address) if self._own("authenticate") else None

    def prepare_nowait(self, principal: Principal, request: PreparedRequest) -> PreparedRequest | None:
        return self.prepare(principal, request) if self._own("prepare") else None

    def admit_nowait(self, principal: Principal, prepared: PreparedRequest, prompt_tokens: int) -> Ticket | None:
        return self.admit(principal, prepared, prompt_tokens) if self._own("admit") else None

    def finish_nowait(self, ticket: Ticket, outcome: Outcome) -> bool | None:
        return True if self._own("finish") else None

    def is_operator_nowait(self, principal: Principal) -> bool | None:
        return self.is_operator(principal) if self._own("is_operator") else None

    def feedback(
        self, principal: Principal, request_id: str, rating: int, comment: str | None, tags: list[str]
    ) -> None:
        pass
