"""The draft model: a smaller network of the target's vocabulary that proposes tokens for the
target to verify (speculative decoding).

Inside: :class:`DraftModel` (a model, a KV cache of its own with a few slots, and
:meth:`~DraftModel.propose`), :class:`DraftItem` (one sequence's share of a proposal) and
:func:`check_draft_model` (the draft and the target must share their vocabulary).

Proposals are greedy: each drafted token is the draft model's argmax after the tokens before
it, so a draft is a function of the sequence (its proposal distribution q is one-hot). That is
what keeps verification exact, unchanged from prompt lookup's
(:meth:`~zigllama_batch.engine.runner.Engine.step`): greedy requests accept the longest drafted
prefix the target itself would choose; sampled ones accept a drafted token with the target's
probability of it and, at the first rejection, draw from the target's distribution with that
token taken out and the rest renormalised, which is speculative sampling with a one-hot q.

One call, for every drafting sequence at once: first each feeds the tokens its slot does not
hold yet (the tokens accepted since its last proposal, or its prompt, a chunk at a time, the
first time), all in one forward pass; a sequence whose tokens are all in takes the argmax at
its last position as its first draft, and then ``k - 1`` one-token steps follow, batched over
the sequences still drafting, each feeding the token drafted last. The last drafted token is
never fed: nothing needs its keys and values unless it is accepted, and then the next call
feeds it with the rest.

Which slot a sequence holds, how many of its positions the slot holds, and forgetting drafted
positions the target rejected are the owner's bookkeeping
(:class:`~zigllama_batch.batching.model_drafter.ModelDrafter`): positions past what a slot
holds are overwritten by the next feed, so rolling back writes nothing.

Left out: sampled drafts (a q other than one-hot: verification would need its probabilities),
tree drafts, and a draft model of another vocabulary (token ids would need translating).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidRequest
from .runner import Model
from .step import SequenceStep
from .tokenizer import Tokenizer

__all__ = ["DraftItem", "DraftModel", "check_draft_model"]


@dataclass(frozen=True, slots=True)
class DraftItem:
    """One sequence's part of a proposal."""

    slot: int
    """The draft model's cache slot holding the sequence's first ``start_pos`` tokens."""
    token_ids: Sequence[int]
    """Tokens of the sequence the slot does not hold yet (at least one)."""
    start_pos: int
    """Position of ``token_ids[0]``."""
    draft: int
    """Tokens to propose after ``token_ids``; 0 when they are not all of the sequence's
    tokens yet (a chunk of a long catch-up)."""


class DraftModel:
    """A model proposing drafted tokens greedily, with a cache of ``n_slots`` sequences.

    :meth:`propose` runs in the step thread (it is a forward pass like a step), touching only
    the slots its items name; :meth:`release` is for a slot no call is using.
    """

    def __init__(self, model: Model, *, n_slots: int, max_context: int) -> None:
        """Args:
        model: the draft model's weights and forward pass.
        n_slots: sequences that can draft at once.
        max_context: positions per slot (the target's; capped by the draft model's own
            context).
        """
        self.model = model
        context = min(max_context, model.config.context_length)
        self.cache = model.new_cache(n_slots, context)

    @property
    def n_slots(self) -> int:
        """Sequences the cache holds at once."""
        return self.cache.n_slots

    @property
    def max_context(self) -> int:
        """Positions one sequence may occupy."""
        return self.cache.max_context

    @property
    def model_name(self) -> str:
        """The draft model's name."""
        return self.model.config.name

    def propose(self, items: Sequence[DraftItem]) -> list[list[int]]:
        """Feed each item's tokens, then draft up to its ``draft`` tokens greedily (see the
        module docstring).

        Returns:
            One list per item: its drafted tokens (empty when ``draft`` is 0).
        """
        if not items:
            return []
        steps = [SequenceStep(it.slot, it.token_ids, it.start_pos) for it in items]
        logits = self.model.step(steps, self.cache)  # (items, vocab): each item's last position
        drafts = [[int(np.argmax(logits[i]))] if it.draft else [] for i, it in enumerate(items)]
        going = [i for i, it in enumerate(items) if it.draft > 1]
        while going:
            steps = [
                SequenceStep(
                    items[i].slot,
                    drafts[i][-1:],
                    items[i].start_pos + len(items[i].token_ids) + len(drafts[i]) - 1,
                )
                for i in going
            ]
            logits = self.model.step(steps, self.cache)  # (len(going), vocab)
            for row, i in enumerate(going):
                drafts[i].append(int(np.argmax(logits[row])))
            going = [i for i in going if len(drafts[i]) < items[i].draft]
        return drafts

    def release(self, slot: int) -> None:
        """Give ``slot``'s memory back to the OS (its sequence left; no call is using it)."""
        self.cache.release(slot, 0)

    def __repr__(self) -> str:
        return f"DraftModel({self.model_name}, {self.cache!r})"


def check_draft_model(
    draft: tuple[Model, Tokenizer], *, tokenizer: Tokenizer, vocab_size: int
) -> None:
    """Refuse a draft model whose token ids would not mean what the target's mean.

    Args:
        draft: the draft model and its tokenizer (as ``load_model`` returns them).
        tokenizer: the target's tokenizer.
        vocab_size: token ids the target scores.

    Raises:
        InvalidRequest: the vocabulary sizes differ (the model's or the tokenizer's), or the
            special tokens do (ids, text, or which ones start and end a sequence).
    """
    model, draft_tokenizer = draft
    if model.config.vocab_size != vocab_size:
        raise InvalidRequest(
            f"draft_model: {model.config.name} scores {model.config.vocab_size} token ids and "
            f"the target {vocab_size}; a draft model must share the target's vocabulary"
        )
    if draft_tokenizer.vocab_size != tokenizer.vocab_size:
        raise InvalidRequest(
            f"draft_model: its tokenizer has {draft_tokenizer.vocab_size} tokens and the "
            f"target's {tokenizer.vocab_size}; a draft model must share the target's vocabulary"
        )
    mine = (draft_tokenizer.bos_id, draft_tokenizer.eos_id, draft_tokenizer.stop_ids)
    theirs = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.stop_ids)
    if mine != theirs or draft_tokenizer.special_tokens != tokenizer.special_tokens:
        differ = sorted(
            i
            for i in {*draft_tokenizer.special_tokens, *tokenizer.special_tokens}
            if draft_tokenizer.special_tokens.get(i) != tokenizer.special_tokens.get(i)
        )
        raise InvalidRequest(
            f"draft_model: its special tokens differ from the target's (bos, eos, stop ids "
            f"{mine} against {theirs}; ids whose special token differs: {differ[:10]}); a "
            f"draft model must share the target's tokenizer"
        )
