"""The joint EBAE/EBAR prompt: presets, and their token ids for one tokenizer.

A document is laid out as

    [prefix] TEXT [self_suffix] [next_suffix]

and each suffix ends in `num_emb_tokens` embedding tokens. Lengths and ids always
come from the tokenizer at hand: nothing here knows LLaMA-2's ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from llara_dist.errors import UserError

CUSTOM = "custom"  # the preset of an objective that sets its own fields; the rest are paper's
EOS = "{eos}"  # placeholder in a template for the tokenizer's own end-of-sequence token


@dataclass(frozen=True)
class Preset:
    prefix: str
    self_suffix: str
    next_suffix: str
    num_emb_tokens: int
    new_tokens: tuple[str, ...]
    pool: str  # loss pooling: "token" (k == 1) or "max" over the k positions' logits
    lm_weight: float
    bow_scale: float
    bow_average: bool
    embed_pool: str  # inference pooling: "last" or "mean" of the k embedding states


_S = tuple(f"<s{i}>" for i in range(1, 17))

PRESETS: dict[str, Preset] = {
    # arXiv 2312.15503, eq. 6: one embedding token (</s>) per task, plain BoW loss.
    "paper": Preset(
        prefix="",
        self_suffix=" The original sentence: " + EOS,
        next_suffix=" The next sentence: " + EOS,
        num_emb_tokens=1,
        new_tokens=(),
        pool="token",
        lm_weight=0.0,
        bow_scale=1.0,
        bow_average=False,
        embed_pool="last",
    ),
    # FlagEmbedding research/LLARA: 8 new tokens per task, max-pooled logits,
    # next-token loss on the text, BoW averaged over the tasks and divided by 10.
    "released": Preset(
        prefix='"',
        self_suffix='", summarize the above passage within eight words: ' + "".join(_S[:8]),
        next_suffix='", predict the following passage within eight words: ' + "".join(_S[8:]),
        num_emb_tokens=8,
        new_tokens=_S,
        pool="max",
        lm_weight=1.0,
        bow_scale=0.1,
        bow_average=True,
        embed_pool="mean",
    ),
}


def resolve_preset(cfg) -> Preset:
    """An ObjectiveConfig to a Preset: fields left None take the named preset's value (`custom`'s:
    `paper`'s, docs/objective.md). Any other name is refused: a misspelt preset would otherwise
    train or encode with prompts nobody chose."""
    if cfg.preset != CUSTOM and cfg.preset not in PRESETS:
        raise UserError(f"preset {cfg.preset!r} is not one of {', '.join(PRESETS)}, {CUSTOM}")
    base = PRESETS.get(cfg.preset, PRESETS["paper"])
    values = {}
    for name in Preset.__dataclass_fields__:
        v = getattr(cfg, name, None)
        values[name] = tuple(v) if name == "new_tokens" and v is not None else v
        if values[name] is None:
            values[name] = getattr(base, name)
    return Preset(**values)


@dataclass(frozen=True)
class PromptTokens:
    """A preset's token ids under one tokenizer."""

    prefix: tuple[int, ...]  # BOS (if the tokenizer has one) + the prefix text
    self_suffix: tuple[int, ...]
    next_suffix: tuple[int, ...]
    num_emb_tokens: int

    @property
    def overhead(self) -> int:
        """Tokens a document adds to its row besides its text."""
        return len(self.prefix) + len(self.self_suffix) + len(self.next_suffix)


def add_special_tokens(tokenizer, preset: Preset) -> int:
    """Add the preset's new tokens; returns how many were new (resize the model by that)."""
    return tokenizer.add_tokens(list(preset.new_tokens), special_tokens=True) if preset.new_tokens else 0


def prompt_tokens(tokenizer, preset: Preset) -> PromptTokens:
    """Tokenize a preset's parts; checks that each suffix really ends in k embedding tokens."""
    eos = tokenizer.eos_token
    if EOS in preset.self_suffix + preset.next_suffix and eos is None:
        raise UserError("the preset's prompts end in {eos} but the tokenizer has no eos_token")

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text.replace(EOS, eos or ""), add_special_tokens=False)["input_ids"])

    bos = (tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ()
    prefix = bos + (ids(preset.prefix) if preset.prefix else ())
    k = preset.num_emb_tokens
    parts = {"self_suffix": ids(preset.self_suffix), "next_suffix": ids(preset.next_suffix)}
    for name, toks in parts.items():
        template = getattr(preset, name)
        expected = tuple(tokenizer.convert_tokens_to_ids(_emb_tail(template, k, preset.new_tokens, eos)))
        if len(toks) <= k or toks[-k:] != expected:
            raise UserError(
                f"{name} {template!r} does not end in its {k} embedding token(s) under this tokenizer "
                f"(got ids {list(toks[-k:])}, expected {list(expected)}); "
                "were the preset's new tokens added to the tokenizer?")
    return PromptTokens(prefix, parts["self_suffix"], parts["next_suffix"], k)


def _emb_tail(template: str, k: int, new_tokens: tuple[str, ...], eos: str | None) -> list[str]:
    """The k token strings a template must end in: {eos} or the preset's new tokens."""
    candidates = sorted(set(new_tokens) | {EOS}, key=len, reverse=True)
    tail, rest = [], template
    while len(tail) < k:
        hit = next((t for t in candidates if rest.endswith(t)), None)
        if hit is None:
            raise UserError(f"prompt {template!r} must end in {k} embedding token(s): "
                             "{eos} or tokens listed in new_tokens")
        tail.insert(0, eos if hit == EOS else hit)
        rest = rest[: -len(hit)]
    return tail
