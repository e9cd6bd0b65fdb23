"""Catastrophic forgetting: how well the backbone still models general-domain text.

Before fine-tuning and at every evaluation, every worker scores the same fixed set of
general-text sequences (`eval.general_text`, read once by the driver: a few thousand
tokens, so every rank simply scores them all, and runs the same forward passes, which
ZeRO-3's collective weight gathering needs):

- encoders: masked-LM loss, 15% of the tokens masked with a fixed seed (BERT's 80/10/10),
  predicted from the backbone's last hidden states by the checkpoint's own masked-LM head;
  when the checkpoint has none (a bare `BertModel`, sentence-transformers models), by a
  probe: a small head (dense, GELU, LayerNorm, then the pretrained input embeddings as
  the output layer) trained on the frozen pretrained backbone first, on one half of the
  sequences, then frozen; the other half is scored;
- decoders: perplexity, from the model itself (causal_lm) or from the backbone's last
  hidden states and the checkpoint's own LM head (a decoder with a classification head).

The ratio after / before is the forgetting figure: 1.0 means the backbone still predicts
general text as well as it did. The same sequences, masks and head are used every time,
so the figures differ only by what training did to the backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from rayft.config import RayftConfig
from rayft.tasks.common import IGNORE_INDEX

MASK_FRACTION = 0.15
MASK_SEED = 0
PROBE_LR = 2e-3
PROBE_BATCH = 256  # target tokens per probe step
PROBE_FILE = "forgetting_probe.pt"
# The probe's half of the text is masked this many times over (different positions each
# time): more targets to fit from the same few thousand tokens, so it generalizes to the
# scored half instead of memorizing its own.
PROBE_MASKINGS = 4

Kind = Literal["mlm", "clm"]


class ProbeHead(torch.nn.Module):
    """A masked-LM head in BERT's shape whose output layer is the pretrained (frozen)
    input embedding matrix: only the transform and the output bias train."""

    def __init__(self, hidden_size: int, embeddings: torch.Tensor):
        super().__init__()
        width = embeddings.shape[1]
        self.dense = torch.nn.Linear(hidden_size, width)
        self.norm = torch.nn.LayerNorm(width)
        self.register_buffer("embeddings", embeddings, persistent=False)
        self.bias = torch.nn.Parameter(torch.zeros(embeddings.shape[0]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), self.embeddings, self.bias)


@dataclass
class Forgetting:
    """The fixed general-text batches and the head that scores them."""

    kind: Kind
    head_source: Literal["pretrained", "probe", "model"]
    head: torch.nn.Module | None  # None: the model's own output layer (causal_lm)
    batches: list[dict[str, torch.Tensor]]  # scored before training and at every eval
    tokens: int  # scored tokens
    text: str
    probe_batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    note: str | None = None  # why a probe scores this backbone

    @property
    def measure(self) -> str:
        return "mlm_loss" if self.kind == "mlm" else "perplexity"

    def value(self, loss: float) -> float:
        """The reported figure for a mean token loss: the loss itself for masked LM, the
        perplexity for decoders (capped where exp would overflow)."""
        return math.exp(min(loss, 700.0)) if self.kind == "clm" else loss

    def ratio(self, before: float, after: float) -> float:
        """after / before of `value` (losses, or perplexities); NaN when a loss is."""
        before, after = self.value(before), self.value(after)
        if not (math.isfinite(before) and math.isfinite(after)):
            return float("nan")
        return after / before if before > 0 else float("inf")

    def loss(self, module: torch.nn.Module, device: torch.device) -> float:
        """Mean loss per scored token (every rank scores the same batches)."""
        was_training = module.training
        module.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.batches:
                summed, n = self._batch_loss(module, {k: v.to(device) for k, v in batch.items()})
                total += float(summed)
                count += n
        module.train(was_training)
        return total / max(count, 1)

    def _batch_loss(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]):
        labels = batch["labels"]
        if self.head is None:  # a causal LM scored by its own output layer
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return _token_loss(logits.logits[:, :-1], labels[:, 1:])
        hidden = backbone(module)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        if self.kind == "clm":
            return _token_loss(self.head(hidden[:, :-1].float()), labels[:, 1:])
        target = labels != IGNORE_INDEX
        return _token_loss(self.head(hidden[target].float()), labels[target])

    # ------------------------------------------------------------------- the probe

    def train_probe(self, module: torch.nn.Module, device: torch.device, steps: int) -> float:
        """Fit the probe on the frozen (pretrained) backbone's hidden states at the masked
        positions of its own half of the sequences (the same on every rank, so every rank
        holds the same probe); return the loss on the scored half (the baseline)."""
        assert self.head is not None
        module.eval()
        feats, targets = [], []
        with torch.no_grad():
            for batch in self.probe_batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden = backbone(module)(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).last_hidden_state
                target = batch["labels"] != IGNORE_INDEX
                feats.append(hidden[target].float())
                targets.append(batch["labels"][target])
        module.train()
        x, y = torch.cat(feats), torch.cat(targets)
        self.head.to(device).train()
        params = [p for p in self.head.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=PROBE_LR, weight_decay=0.0)
        generator = torch.Generator().manual_seed(MASK_SEED)
        for _ in range(steps):
            pick = torch.randint(len(x), (min(PROBE_BATCH, len(x)),), generator=generator)
            loss = F.cross_entropy(self.head(x[pick.to(device)]), y[pick.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.head.eval().requires_grad_(False)
        return self.loss(module, device)

    def probe_state(self) -> dict[str, torch.Tensor]:
        assert self.head is not None
        return {k: v.detach().cpu() for k, v in self.head.state_dict().items()}

    def load_probe(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        assert self.head is not None
        self.head.load_state_dict(state)
        self.head.to(device).eval().requires_grad_(False)


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the positions with a target, and their number."""
    labels = labels.reshape(-1)
    summed = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return summed, int((labels != IGNORE_INDEX).sum())


def backbone(module: torch.nn.Module) -> torch.nn.Module:
    """The transformer body of a task model (inside a peft wrapper when there is one):
    `model.bert`, `model.model`, ... as transformers names it (`base_model`)."""
    model = module.get_base_model() if hasattr(module, "get_base_model") else module
    return model.base_model


def backbone_kind(cfg: RayftConfig) -> Kind | None:
    """Masked LM for encoders, causal LM for decoders, None when transformers has neither
    head for the architecture."""
    if cfg.task == "causal_lm":
        return "clm"
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    m = cfg.model
    config = AutoConfig.from_pretrained(
        m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code
    )
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder:
        return "mlm"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "clm"
    return None


def _pretrained_head(
    cfg: RayftConfig, kind: Kind
) -> tuple[torch.nn.Module | None, Any, str | None]:
    """The checkpoint's own LM head when it has one (loaded, and the only module beside
    the backbone), else None and why; and the pretrained LM model (a probe's embeddings)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    m = cfg.model
    auto = AutoModelForMaskedLM if kind == "mlm" else AutoModelForCausalLM
    lm, info = auto.from_pretrained(
        m.name_or_path,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        dtype=torch.float32,
        output_loading_info=True,
    )
    prefix = lm.base_model_prefix
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(prefix + ".")]
    heads = [
        child
        for name, child in lm.named_children()
        if name != prefix and any(True for _ in child.parameters())
    ]
    if missing:
        return None, lm, f"the checkpoint has no weights for {missing[0]}"
    if len(heads) != 1:
        names = [n for n, c in lm.named_children() if n != prefix]
        return None, lm, f"its LM head is split over {names}, which rayft does not reassemble"
    return heads[0].eval().requires_grad_(False), lm, None


def read_general_text(cfg: RayftConfig) -> list[str] | None:
    """`eval.general_text`'s paragraphs (one per line), read on the driver so that workers
    on other nodes need no access to the file; None when forgetting is off."""
    path = cfg.eval.general_text
    if not path:
        return None
    from rayft.data import fs

    try:
        text = fs.read_text(path)
    except (OSError, FileNotFoundError) as exc:
        raise ValueError(f"eval.general_text: cannot read {path}: {exc}") from None
    paragraphs = [line.strip() for line in text.splitlines() if line.strip()]
    if not paragraphs:
        raise ValueError(f"eval.general_text: {path} holds no text (one paragraph per line)")
    return paragraphs[: cfg.eval.general_max_tokens]  # a paragraph has at least a token


def general_sequences(
    paragraphs: list[str], tokenizer: Any, length: int, max_tokens: int
) -> list[list[int]]:
    """The paragraphs as one token stream, cut into sequences of `length` tokens with
    the tokenizer's special tokens around each."""
    prefix, suffix = special_tokens(tokenizer)
    room = length - len(prefix) - len(suffix)
    stream: list[int] = []
    for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    return [[*prefix, *stream[i : i + room], *suffix] for i in range(0, len(stream), room)]


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text ([CLS] / [SEP], <s>,
    nothing), read off how it encodes one word."""
    bare = tokenizer("general", add_special_tokens=False)["input_ids"]
    full = tokenizer("general")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def _batch(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _mask(batch: dict[str, torch.Tensor], tokenizer: Any, rng: np.random.Generator) -> None:
    """BERT's masking, reproducibly: 15% of the real, non-special tokens become targets;
    of those 80% are replaced by the mask token, 10% by a random token, 10% kept."""
    ids = batch["input_ids"]
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    candidate = (batch["attention_mask"] == 1) & ~torch.isin(ids, special)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row in range(ids.shape[0]):
        positions = candidate[row].nonzero().flatten().numpy()
        if len(positions) == 0:
            continue
        count = max(1, round(MASK_FRACTION * len(positions)))
        chosen = rng.choice(positions, size=count, replace=False)
        labels[row, chosen] = ids[row, chosen]
        roll = rng.random(count)
        ids[row, chosen[roll < 0.8]] = tokenizer.mask_token_id
        swap = chosen[(roll >= 0.8) & (roll < 0.9)]
        ids[row, swap] = torch.from_numpy(rng.integers(0, len(tokenizer), len(swap)))
    batch["labels"] = labels


def _batches(
    seqs: list[list[int]], tokenizer: Any, kind: Kind, size: int, rng: np.random.Generator
) -> list[dict[str, torch.Tensor]]:
    batches = [
        _batch(seqs[i : i + size], tokenizer.pad_token_id) for i in range(0, len(seqs), size)
    ]
    for batch in batches:
        if kind == "mlm":
            _mask(batch, tokenizer, rng)
        else:
            pad = batch["attention_mask"] == 0
            batch["labels"] = batch["input_ids"].masked_fill(pad, IGNORE_INDEX)
    return batches


def _scored_tokens(batches: list[dict[str, torch.Tensor]], kind: Kind) -> int:
    tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    if kind == "clm":  # a sequence's first token has nothing to be predicted from
        tokens -= sum(len(b["labels"]) for b in batches)
    return tokens


def build(
    cfg: RayftConfig, tokenizer: Any, paragraphs: list[str] | None
) -> Forgetting | None | str:
    """The general-text batches and the scoring head; a string saying why forgetting
    cannot be measured for this model; None when it is off."""
    if not paragraphs:
        return None
    kind = backbone_kind(cfg)
    if kind is None:
        return "no masked-LM or causal-LM head exists for this architecture in transformers"
    if kind == "mlm" and tokenizer.mask_token_id is None:
        return "the tokenizer has no mask token to score masked-LM loss with"
    seqs = general_sequences(
        paragraphs, tokenizer, cfg.train.max_seq_len, cfg.eval.general_max_tokens
    )
    size, rng, text = (
        cfg.train.eval_batch_size,
        np.random.default_rng(MASK_SEED),
        cfg.eval.general_text,
    )
    if cfg.task == "causal_lm":
        batches = _batches(seqs, tokenizer, kind, size, rng)
        return Forgetting(kind, "model", None, batches, _scored_tokens(batches, kind), text)
    head, lm, why = _pretrained_head(cfg, kind)
    if head is not None:
        batches = _batches(seqs, tokenizer, kind, size, rng)
        return Forgetting(kind, "pretrained", head, batches, _scored_tokens(batches, kind), text)
    if kind == "clm":
        return f"the checkpoint has no language-model head to compute perplexity with ({why})"
    if len(seqs) < 2:
        return "eval.general_text is too short to train a probe on half and score the other"
    embeddings = lm.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(MASK_SEED)  # the same initial probe on every rank
    # Trained on one half, scored on the other: a probe that memorized its targets would
    # make the backbone's drift look larger than it is.
    probe_seqs = seqs[0::2]
    probe_batches = [
        b for _ in range(PROBE_MASKINGS) for b in _batches(probe_seqs, tokenizer, kind, size, rng)
    ]
    batches = _batches(seqs[1::2], tokenizer, kind, size, rng)
    return Forgetting(
        kind, "probe", ProbeHead(lm.config.hidden_size, embeddings), batches, _scored_tokens(batches, kind),
        text, probe_batches, note=why,
    )  # fmt: skip
