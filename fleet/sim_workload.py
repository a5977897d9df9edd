"""What the fleet simulator's clients send: a day of diurnal load with bursts, as W4-style multi-turn chats.

Conversations start in each region as a Poisson process whose rate follows the region's local time of day (trough at
04:00, peak at 16:00 local) times its share of the users, with bursts (a region's rate multiplied for a while) at
random times. Each conversation belongs to an application whose system prompt it shares with every other user of
that application (one application is much more popular: the hot prompt a cache-aware router must not pile onto one
replica), and to an API key of a priority class (paid or free; a few keys send many times the others). Like W4
(shared/PERFORMANCE.md) each turn appends a user message and resends the whole history, and the reply becomes part
of the history; the next turn is sent a think time after the reply ended. A conversation stops after its turns, when
a turn is refused or fails, or when the next turn would not fit the context.

Token ids are synthetic (drawn per application and conversation), so prompts that share an opening share its block
hashes exactly as real prompts would (`fleet.policy.block_hashes`).

Time: `hours` of the day are simulated, compressed `time_scale` times (the diurnal envelope and the bursts run that
much faster; conversations, think times and the engine run in real time), so the simulation covers
hours * 3600 / time_scale seconds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class App:
    """An application: its system prompt's length and its share of conversations."""

    name: str
    system_tokens: int
    popularity: float


DEFAULT_APPS = (
    App("assistant", 120, 0.55),
    App("support", 96, 0.2),
    App("tutor", 80, 0.15),
    App("recipes", 64, 0.1),
)


@dataclasses.dataclass(frozen=True)
class KeyClass:
    """A class of API keys: the gate's priority, its share of keys, and how much more each key sends."""

    name: str
    priority: int
    keys: int
    weight: float = 1.0


DEFAULT_KEYS = (
    KeyClass("paid", 2, 40, 1.0),
    KeyClass("free", 0, 160, 1.0),
    KeyClass("free-heavy", 0, 2, 10.0),
)


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """The day the clients make."""

    hours: float = 24.0
    """Hours of the day simulated (from local midnight of the first region)."""
    time_scale: float = 48.0
    """Compression of the day: the diurnal envelope and bursts run this much faster than real time."""
    peak_conversations_per_s: float = 4.0
    """Conversations started per second, all regions together, were every region at its local peak at once."""
    trough_fraction: float = 0.15
    """Rate at the local trough (04:00) as a fraction of the peak (16:00)."""
    region_share: tuple[tuple[str, float, float], ...] = (
        ("us-east", 0.45, -5.0),
        ("eu-west", 0.35, 1.0),
        ("ap-south", 0.2, 5.5),
    )
    """(region, share of users, UTC offset hours) of the clients."""
    bursts_per_day: float = 6.0
    """Bursts per (uncompressed) day, each in one region chosen by share."""
    burst_factor: float = 3.0
    """A burst multiplies its region's rate by this."""
    burst_minutes: float = 30.0
    """Length of a burst in (uncompressed) minutes."""
    turns: tuple[int, int] = (2, 8)
    """Least and most turns of a conversation (uniform)."""
    message_tokens: tuple[int, int] = (10, 40)
    """Tokens of a user message (uniform, inclusive)."""
    max_tokens: tuple[int, int] = (64, 128)
    """A turn's max_tokens (uniform, inclusive); the reply takes 50-100% of it."""
    think_s: float = 8.0
    """Mean think time between a reply's end and the next turn (exponential), seconds."""
    apps: tuple[App, ...] = DEFAULT_APPS
    keys: tuple[KeyClass, ...] = DEFAULT_KEYS
    vocab_size: int = 49152
    max_seq_len: int = 2048
    """The context: a conversation stops when its next turn would not fit."""
    seed: int = 0

    @property
    def duration_s(self) -> float:
        return self.hours * 3600.0 / self.time_scale

    def __post_init__(self) -> None:
        if self.hours <= 0 or self.time_scale <= 0 or self.peak_conversations_per_s < 0:
            raise ValueError("hours and time_scale must be > 0, peak_conversations_per_s >= 0")
        if not self.region_share or not self.apps or not self.keys:
            raise ValueError("the workload needs regions, applications and keys")


def diurnal(local_hour: float, trough_fraction: float) -> float:
    """Share of the peak rate at a local hour: trough_fraction at 04:00, 1 at 16:00, a cosine between."""
    return trough_fraction + (1 - trough_fraction) * (1 - math.cos(2 * math.pi * (local_hour - 4) / 24)) / 2


@dataclasses.dataclass(frozen=True)
class Burst:
    region: str
    start_s: float
    end_s: float


@dataclasses.dataclass
class Turn:
    """One request of a conversation, as the client sends it."""

    conversation: Conversation
    index: int
    prompt: list[int]
    max_tokens: int
    reply: list[int]
    """The tokens the reply will be (its length is the output length)."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


@dataclasses.dataclass
class Conversation:
    """One user's chat: its region, key, application and the history it resends."""

    id: int
    region: str
    key: str
    priority: int
    app: int
    turns: int
    rng: np.random.Generator
    history: list[int]
    sent: int = 0


class Workload:
    """The conversations of a day: `starts()` lists (time, region) of every conversation start; `conversation()`
    makes one; `next_turn()` its next request (or None when it is over)."""

    def __init__(self, config: WorkloadConfig) -> None:
        self.config = config
        rng = np.random.default_rng([config.seed, 1])
        self._system = [[int(t) for t in rng.integers(2, config.vocab_size, a.system_tokens)] for a in config.apps]
        self._keys: list[tuple[str, int]] = []
        weights = []
        for kc in config.keys:
            for i in range(kc.keys):
                self._keys.append((f"{kc.name}-{i}", kc.priority))
                weights.append(kc.weight)
        w = np.asarray(weights, float)
        self._key_p = w / w.sum()
        pop = np.asarray([a.popularity for a in config.apps], float)
        self._app_p = pop / pop.sum()
        self.bursts = self._bursts(np.random.default_rng([config.seed, 2]))
        self._count = 0

    def _bursts(self, rng: np.random.Generator) -> list[Burst]:
        c = self.config
        days = c.hours / 24
        n = rng.poisson(c.bursts_per_day * days)
        share = np.asarray([s for _, s, _ in c.region_share], float)
        out = []
        for _ in range(n):
            region = c.region_share[int(rng.choice(len(share), p=share / share.sum()))][0]
            start = float(rng.uniform(0, c.duration_s))
            out.append(Burst(region, start, start + c.burst_minutes * 60 / c.time_scale))
        return sorted(out, key=lambda b: b.start_s)

    def rate(self, region: str, t: float) -> float:
        """Conversation starts per second in `region` at simulation time `t`."""
        c = self.config
        _, share, offset = next(r for r in c.region_share if r[0] == region)
        utc_hour = (t * c.time_scale / 3600.0) % 24
        base = c.peak_conversations_per_s * share * diurnal((utc_hour + offset) % 24, c.trough_fraction)
        burst = any(b.region == region and b.start_s <= t < b.end_s for b in self.bursts)
        return base * (c.burst_factor if burst else 1.0)

    def starts(self) -> list[tuple[float, str]]:
        """Every conversation start (time, region), in time order: a Poisson process per region whose rate follows
        `rate` (drawn by thinning)."""
        c = self.config
        rng = np.random.default_rng([c.seed, 3])
        out = []
        for region, share, _ in c.region_share:
            top = c.peak_conversations_per_s * share * c.burst_factor
            if top <= 0:
                continue
            t = 0.0
            while True:
                t += float(rng.exponential(1 / top))
                if t >= c.duration_s:
                    break
                if rng.uniform() * top < self.rate(region, t):
                    out.append((t, region))
        return sorted(out)

    def conversation(self, region: str) -> Conversation:
        """A new conversation in `region`: its key, application, turn count and system prompt."""
        c = self.config
        i = self._count
        self._count += 1
        rng = np.random.default_rng([c.seed, 4, i])
        key, priority = self._keys[int(rng.choice(len(self._keys), p=self._key_p))]
        app = int(rng.choice(len(c.apps), p=self._app_p))
        turns = int(rng.integers(c.turns[0], c.turns[1] + 1))
        return Conversation(i, region, key, priority, app, turns, rng, list(self._system[app]))

    def next_turn(self, conv: Conversation) -> Turn | None:
        """The conversation's next request (its history plus a new user message), or None when it is over."""
        c = self.config
        if conv.sent >= conv.turns:
            return None
        rng = conv.rng
        message = [int(t) for t in rng.integers(2, c.vocab_size, int(rng.integers(*c.message_tokens, endpoint=True)))]
        max_tokens = int(rng.integers(c.max_tokens[0], c.max_tokens[1] + 1))
        reply_len = max(1, round(max_tokens * rng.uniform(0.5, 1.0)))
        reply = [int(t) for t in rng.integers(2, c.vocab_size, reply_len)]
        prompt = conv.history + message
        if len(prompt) + max_tokens > c.max_seq_len:
            return None
        conv.sent += 1
        return Turn(conv, conv.sent - 1, prompt, max_tokens, reply)

    def think_time(self, conv: Conversation) -> float:
        return float(conv.rng.exponential(self.config.think_s))

    @staticmethod
    def completed(turn: Turn) -> None:
        """The reply arrived: it joins the history the next turn resends."""
        turn.conversation.history = turn.prompt + turn.reply


def regions_of(config: WorkloadConfig) -> Sequence[str]:
    return [r for r, _, _ in config.region_share]
