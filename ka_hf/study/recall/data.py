"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023), deterministic from a seed.

A sequence of T tokens holds P key-value pairs, then queries:

    k_1 v_1 k_2 v_2 ... k_P v_P | x x k_3 x k_1 x x x k_P x ...
    positions 0 .. 2P-1          the query section: every key once, at an even offset, filler tokens elsewhere

At the position of a query (a key seen in the pairs) the model must predict the key's paired value: the target at
that position is the value (the logits there predict the next token, as in Zoology's shifted labels). Every other
position is not scored (-100). The query section is filled with filler tokens, which are neither keys nor values,
so that no filler can be mistaken for an earlier occurrence of a key.

The vocabulary: `filler` filler tokens first, then the key tokens, then as many value tokens. Keys in a sequence
are distinct; values are drawn with replacement. Where the queries go sets the key -> query distance:

    uniform   the P query slots drawn uniformly without replacement from the query section's even offsets
    power:A   Zoology's: slot g (0, 1, ...) drawn with weight (g + 1)^(A - 1), so most queries come soon after the
              pairs (A = 0.01 in Zoology); keys are assigned to the slots in a random order

The distance of a query is its position minus the position of its key (at least 2: the last key, queried first).
"""

import dataclasses
from dataclasses import dataclass

import torch

from ka_hf.errors import KAError

IGNORE = -100


@dataclass(frozen=True)
class RecallShape:
    """One kind of sequence: `seq_len` tokens with `pairs` key-value pairs."""

    seq_len: int
    pairs: int

    @property
    def name(self) -> str:
        return f"T={self.seq_len},pairs={self.pairs}"

    @property
    def query_slots(self) -> int:
        return (self.seq_len - 2 * self.pairs) // 2


@dataclass(frozen=True)
class RecallTask:
    """The generator's settings: vocabulary and how queries are placed."""

    vocab_size: int = 128
    filler: int = 8  # filler tokens (ids 0 .. filler-1); keys and values split the rest in half
    distance: str = "uniform"  # "uniform" or "power:A"

    @property
    def num_keys(self) -> int:
        return (self.vocab_size - self.filler) // 2

    @property
    def key_ids(self) -> range:
        return range(self.filler, self.filler + self.num_keys)

    @property
    def value_ids(self) -> range:
        return range(self.filler + self.num_keys, self.filler + 2 * self.num_keys)

    def power(self) -> float | None:
        """A of "power:A", None for "uniform" (KAError for anything else)."""
        if self.distance == "uniform":
            return None
        kind, _, value = self.distance.partition(":")
        try:
            power = float(value)
        except ValueError:
            power = None
        if kind != "power" or power is None or not power > 0:
            raise KAError(f"distance {self.distance!r}: use 'uniform' or 'power:A' with A > 0 (Zoology: power:0.01)")
        return power

    def check(self, shape: RecallShape) -> None:
        """KAError unless sequences of `shape` can be made with this vocabulary."""
        self.power()
        if self.filler < 1:
            raise KAError(f"filler {self.filler}: give at least 1 filler token")
        if shape.pairs < 1:
            raise KAError(f"{shape.name}: give at least one pair")
        if self.num_keys < shape.pairs:
            raise KAError(
                f"{shape.name}: {shape.pairs} distinct keys per sequence, but a vocabulary of {self.vocab_size} "
                f"with {self.filler} filler tokens has only {self.num_keys} keys: raise the vocabulary size"
            )
        if shape.query_slots < shape.pairs:
            raise KAError(
                f"{shape.name}: the query section holds {shape.query_slots} query slots, fewer than the "
                f"{shape.pairs} keys to query: use a longer sequence or fewer pairs"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RecallSet:
    """`n` sequences of one shape: input_ids [n, T]; targets [n, T] (the paired value at a query, else -100);
    distance [n, T] (query position - key position at a query, else 0)."""

    shape: RecallShape
    input_ids: torch.Tensor
    targets: torch.Tensor
    distance: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def batches(self, batch_size: int):
        """The set in consecutive pieces of up to batch_size sequences (RecallSets too)."""
        for start in range(0, len(self), batch_size):
            piece = slice(start, start + batch_size)
            yield RecallSet(self.shape, self.input_ids[piece], self.targets[piece], self.distance[piece])


def make_recall_set(task: RecallTask, shape: RecallShape, n: int, seed: int) -> RecallSet:
    """`n` sequences of `shape`, the same for the same (task, shape, n, seed)."""
    task.check(shape)
    generator = torch.Generator().manual_seed(seed)
    pairs, context = shape.pairs, 2 * shape.pairs
    keys = torch.rand(n, task.num_keys, generator=generator).argsort(-1)[:, :pairs] + task.filler
    values = torch.randint(task.value_ids.start, task.value_ids.stop, (n, pairs), generator=generator)
    input_ids = torch.randint(0, task.filler, (n, shape.seq_len), generator=generator)
    input_ids[:, 0:context:2], input_ids[:, 1:context:2] = keys, values
    slots = _query_slots(task, shape, n, generator)  # [n, pairs]: the slot of key i's query
    query_positions = context + 2 * slots
    rows = torch.arange(n)[:, None].expand(n, pairs)
    input_ids[rows, query_positions] = keys
    targets = torch.full_like(input_ids, IGNORE)
    targets[rows, query_positions] = values
    distance = torch.zeros_like(input_ids)
    distance[rows, query_positions] = query_positions - 2 * torch.arange(pairs)[None]
    return RecallSet(shape, input_ids, targets, distance)


def _query_slots(task: RecallTask, shape: RecallShape, n: int, generator) -> torch.Tensor:
    """[n, pairs] distinct slots of the query section, one per key (key i's in column i)."""
    power = task.power()
    if power is None:
        weights = torch.ones(n, shape.query_slots)
    else:
        weights = (torch.arange(shape.query_slots, dtype=torch.float64) + 1) ** (power - 1)
        weights = weights.expand(n, -1)
    chosen = torch.multinomial(weights, shape.pairs, replacement=False, generator=generator)
    # multinomial without replacement returns slots in draw order (small ones first under power): shuffle which
    # key gets which slot, so that the query order does not follow the pair order
    order = torch.rand(n, shape.pairs, generator=generator).argsort(-1)
    return chosen.gather(1, order)


def parse_shapes(text: str) -> list[RecallShape]:
    """'64x4,128x8,256x16' -> shapes (sequence length x pairs)."""
    shapes = []
    for piece in (p.strip() for p in text.split(",") if p.strip()):
        length, _, pairs = piece.partition("x")
        if not (length.isdigit() and pairs.isdigit()):
            raise KAError(f"shape {piece!r}: write LENGTHxPAIRS, e.g. 64x4,128x8,256x16")
        shapes.append(RecallShape(int(length), int(pairs)))
    if not shapes:
        raise KAError("no shapes given: write LENGTHxPAIRS, e.g. 64x4,128x8,256x16")
    return shapes
