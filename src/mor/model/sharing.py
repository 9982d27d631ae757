"""Which distinct layer each unrolled position runs, for the four sharing strategies (MOR_SPEC 3.1).

Positions are 0-based over the unrolled depth ``L_eff``. With ``B`` layers in the shared block and ``Nr``
recursions:

- cycle:           position l runs shared layer ``l mod B``                 (0,1,2, 0,1,2, 0,1,2)
- sequence:        position l runs shared layer ``l div Nr``                (0,0,0, 1,1,1, 2,2,2)
- middle_cycle:    first and last layer unique, the middle cycles
- middle_sequence: first and last layer unique, the middle repeats each layer Nr times

Recursion step ``r`` (1-based) of the cycle strategies is one application of the whole block; routers act
between steps, so only the cycle strategies can be routed.
"""

from __future__ import annotations

from dataclasses import dataclass

from mor.config import MoRConfig


@dataclass(frozen=True)
class LayerPlan:
    layer_of: tuple[int, ...]  # unrolled position -> index of the distinct layer it runs
    prelude: tuple[int, ...]  # positions before the recursion block (middle-*: the unique first layer)
    steps: tuple[tuple[int, ...], ...]  # positions of each recursion step (cycle strategies), else one step
    coda: tuple[int, ...]  # positions after the block (middle-*: the unique last layer)

    @property
    def num_positions(self) -> int:
        return len(self.layer_of)

    def kv_source(self, position: int) -> int:
        """The first position that runs the same layer: whose keys/values recursive KV sharing reuses."""
        return self.layer_of.index(self.layer_of[position])


def layer_plan(config: MoRConfig) -> LayerPlan:
    if config.sharing == "none":
        n = config.num_hidden_layers
        return LayerPlan(tuple(range(n)), (), (tuple(range(n)),), ())

    block, nr = config.recursion_block_size, config.num_recursions
    offset = 1 if config.is_middle else 0
    if config.is_cycle:
        middle = [offset + i for _ in range(nr) for i in range(block)]
    else:
        middle = [offset + i for i in range(block) for _ in range(nr)]

    if config.is_middle:
        last = block + 1
        layer_of = (0, *middle, last)
        prelude, coda = (0,), (len(layer_of) - 1,)
    else:
        layer_of = tuple(middle)
        prelude, coda = (), ()

    if config.is_cycle:
        steps = tuple(tuple(offset + r * block + i for i in range(block)) for r in range(nr))
    else:
        steps = (tuple(range(offset, offset + block * nr)),)
    return LayerPlan(layer_of, prelude, steps, coda)
