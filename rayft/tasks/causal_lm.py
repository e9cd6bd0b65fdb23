"""Causal language modelling for instruction / chat tuning (decoders: Llama, GPT-2, Qwen...).

A row is a conversation: prompt / response, instruction (+ input) / output, or a list of
chat messages. It is written out with the tokenizer's chat template when it has one (see
`data.chat_template`), else with `data.prompt_template`, and tokenized piece by piece so
that only the response (every assistant turn) is trained on: prompt tokens get the label
-100. With `data.packing`, several examples share a sequence (`pack`); their positions restart
at 0 and no attention mask is passed, which transformers reads as separate sequences (the
run checks the model really keeps them apart before it trains). Reported: eval loss and
perplexity over response tokens; a few greedy generations are saved at the end."""

from __future__ import annotations

import bisect
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rayft.config import DataConfig, RayftConfig, max_tokens
from rayft.tasks import Task
from rayft.tasks.common import IGNORE_INDEX, pad_sequences

ALPACA = (
    "Below is an instruction that describes a task{with_input}. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
)
ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- records


def extract(record: dict[str, Any], data: DataConfig) -> tuple[dict | None, str | None]:
    """-> `messages` (JSON list of {role, content}) plus `text` (every turn, for cleaning
    statistics and deduplication). Prompt / instruction rows become user + assistant."""
    return _fields(*conversation(record, data, answered=True))


def extract_inputs(record: dict[str, Any], data: DataConfig) -> tuple[dict | None, str | None]:
    """`extract` for `rayft predict`: the response may be missing (it is what is asked)."""
    return _fields(*conversation(record, data, answered=False))


def _fields(turns: list[dict] | None, reason: str | None) -> tuple[dict | None, str | None]:
    if turns is None:
        return None, reason
    return {
        "text": "\n".join(t["content"] for t in turns),
        "messages": json.dumps(turns, ensure_ascii=False),
    }, None


def conversation(
    record: dict[str, Any], data: DataConfig, *, answered: bool
) -> tuple[list[dict[str, str]] | None, str | None]:
    """The record as turns, or why it cannot be one. `answered`: the response must be
    there (training); otherwise prompt and instruction rows are read without it, and a
    chat row needs no assistant turn."""
    if data.messages_column in record:
        messages = record[data.messages_column]
        if not isinstance(messages, list) or not messages:
            return None, "messages_not_a_list"
        turns = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return None, "message_without_content"
            if m.get("role") not in ROLES:
                return None, "message_role_not_system_user_assistant"
            turns.append({"role": m["role"], "content": m["content"]})
        if answered and not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
            return None, "no_assistant_turn"
        return turns, None
    if data.instruction_column in record:
        instruction, given = record[data.instruction_column], record.get(data.input_column) or ""
        output = record.get(data.output_column) if answered else ""
        if not all(isinstance(x, str) for x in (instruction, output, given)):
            return None, "instruction_input_or_output_not_a_string"
        if not instruction.strip() or (answered and not output.strip()):
            return None, "empty_instruction_or_output"
        user = {"role": "user", "content": render_instruction(instruction, given, data)}
    elif data.prompt_column in record:
        prompt = record[data.prompt_column]
        output = record.get(data.response_column) if answered else ""
        if not isinstance(prompt, str) or not isinstance(output, str):
            return None, "prompt_or_response_not_a_string"
        if answered and not output.strip():
            return None, "empty_response"
        template = data.prompt_template or "{prompt}"
        user = {"role": "user", "content": template.format(prompt=prompt)}
    else:
        return None, "no_prompt_instruction_or_messages"
    return [user, {"role": "assistant", "content": output}] if answered else [user], None


def render_instruction(instruction: str, given: str, data: DataConfig) -> str:
    if data.prompt_template:
        return data.prompt_template.format(instruction=instruction, input=given)
    text = ALPACA.format(
        with_input=", paired with an input" if given else "", instruction=instruction
    )
    if given:
        text += f"### Input:\n{given}\n\n"
    return text + "### Response:\n"


# ------------------------------------------------------------------------- rendering


def uses_chat_template(tokenizer: Any, data: DataConfig) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if data.chat_template == "always" and not has:
        raise ValueError(
            "data.chat_template=always, but the tokenizer has no chat template; set "
            "data.chat_template=never (and data.prompt_template) or use a chat tokenizer"
        )
    return has and data.chat_template != "never"


def segments(
    turns: list[dict[str, str]], tokenizer: Any, data: DataConfig
) -> list[tuple[str, bool]]:
    """The conversation as (text, trained on?) pieces, in order: assistant turns are
    trained on, everything else (system, user, the template's markup) is context."""
    if uses_chat_template(tokenizer, data):
        pieces, done = [], ""
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(
                turns[:i], tokenize=False, add_generation_prompt=True
            )
            full = tokenizer.apply_chat_template(turns[: i + 1], tokenize=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError(
                    "the tokenizer's chat template does not render a conversation as a "
                    "prefix of its continuation; set data.chat_template=never"
                )
            pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        return [(text, trained) for text, trained in pieces if text]
    if len(turns) == 2 and turns[0]["role"] == "user":  # prompt / instruction rows: as written
        return [(turns[0]["content"], False), (turns[1]["content"], True)]
    pieces = []
    for turn in turns:
        pieces.append((f"<|{turn['role']}|>\n", False))
        pieces.append((turn["content"] + "\n", turn["role"] == "assistant"))
    return pieces


def prompt_text(turns: list[dict[str, str]], tokenizer: Any, data: DataConfig) -> str:
    """What a generation starts from: the conversation up to its last assistant turn."""
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    pieces = segments(turns[: last + 1], tokenizer, data)
    return "".join(text for text, _ in pieces[:-1])


def generation_prompt(turns: list[dict[str, str]], tokenizer: Any, data: DataConfig) -> str:
    """`prompt_text` of a conversation that may not end with an assistant turn (`rayft
    predict`): then the model is asked for the next one."""
    if turns[-1]["role"] != "assistant":
        # A stand-in answer, cut off again by `prompt_text`: everything before it is the
        # prompt, rendered exactly as training renders the turns before an answer.
        turns = [*turns, {"role": "assistant", "content": "..."}]
    return prompt_text(turns, tokenizer, data)


def encode(row_turns: list[dict[str, str]], tokenizer: Any, cfg: RayftConfig) -> tuple[list, list]:
    """(input ids, labels) of one conversation, within `train.max_seq_len`: a prompt too
    long to leave room gives up its beginning, then the response is cut at the end."""
    ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    pieces = segments(row_turns, tokenizer, cfg.data)
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if (
        cfg.data.add_eos
        and tokenizer.eos_token_id is not None
        and ids[-1] != tokenizer.eos_token_id
    ):
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    limit = max_tokens(cfg)
    if len(ids) > limit:
        first_trained = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
        cut = max(0, min(first_trained - limit // 2, len(ids) - limit))
        ids, labels = ids[cut:][:limit], labels[cut:][:limit]
    return ids, labels


def tokenize(
    batch: dict[str, np.ndarray], tokenizer: Any, cfg: RayftConfig, label2id: dict[str, int]
) -> dict[str, Any]:
    """Rows -> sequences: one per row, or with `data.packing` as many rows as fit in each
    (`pack`, within this batch); `_row` names a sequence's first row."""
    encoded = [encode(json.loads(m), tokenizer, cfg) for m in batch["messages"]]
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": [], "_row": []}

    def emit(rows: list[int]) -> None:
        ids, labels, positions = join([encoded[r] for r in rows])
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
        out["_row"].append(rows[0])

    if not cfg.data.packing:
        for r in range(len(encoded)):
            emit([r])
    else:
        for rows in pack([len(ids) for ids, _ in encoded], max_tokens(cfg)):
            emit(rows)
    out["_row"] = np.asarray(out["_row"], dtype=np.int64)
    return out


def join(examples: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, ...]:
    """Encoded examples (ids, labels) -> one sequence's input ids, labels and positions,
    the positions restarting at each example."""
    ids, labels, positions = [], [], []
    for example_ids, example_labels in examples:
        ids += example_ids
        # The first token of each example is never a target: nothing of it precedes.
        labels += [IGNORE_INDEX] + list(example_labels[1:])
        positions += list(range(len(example_ids)))
    return tuple(np.asarray(x, dtype=np.int32) for x in (ids, labels, positions))


def pack(lengths: list[int], limit: int) -> list[list[int]]:
    """Rows (by index) into sequences of at most ``limit`` tokens, best fit decreasing:
    longest row first, each into the fullest sequence that still has room for it. Packing
    rows in their order instead closes a sequence at the first row that does not fit,
    which left Dolly's windows 78% full at 256 tokens (91% at 2,048) against 98-99% this
    way, so an epoch is 20% (9%) fewer steps (benchmarks/RESULTS.md, Packing). Ties keep
    row order, so the result is the same on every run; sequences come in the order of
    their first rows, each listing its rows in order."""
    order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))
    sequences: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens still free, sequence), ascending
    for r in order:
        at = bisect.bisect_left(room, (lengths[r], -1))  # the tightest sequence it fits
        if at < len(room):
            free, index = room.pop(at)
            sequences[index].append(r)
        else:
            free, index = limit, len(sequences)
            sequences.append([r])
        bisect.insort(room, (free - lengths[r], index))
    return sorted(sorted(rows) for rows in sequences)


def collate(batch: dict[str, np.ndarray], pad_id: int, multiple: int) -> dict[str, torch.Tensor]:
    """Padded on the right. Packed sequences (positions restart inside a row) go without
    an attention mask, their padding being one more sequence of its own that no target
    reads; unpacked ones get the usual mask."""
    input_ids, attention_mask = pad_sequences(batch["input_ids"], pad_id, multiple)
    labels, _ = pad_sequences(batch["labels"], IGNORE_INDEX, multiple)
    packed = any(int(np.count_nonzero(np.asarray(p) == 0)) > 1 for p in batch["position_ids"])
    if not packed:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    positions = torch.zeros_like(input_ids)
    for i, p in enumerate(batch["position_ids"]):
        n = len(p)
        positions[i, :n] = torch.from_numpy(np.array(p, dtype=np.int64))
        positions[i, n:] = torch.arange(input_ids.shape[1] - n)
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels}


def auto_class() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def model_kwargs(labels: list[str]) -> dict[str, Any]:
    # No key/value cache while training: transformers only reads restarting positions as
    # separate (packed) sequences when there is none. Generation turns it back on.
    return {"use_cache": False}


# ----------------------------------------------------------------------- predictions


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed negative log-likelihood of its targets and their number (the usual
    shift: position t predicts token t + 1)."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    return nll.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def predict(outputs: Any, inputs: dict[str, Any], cfg: RayftConfig) -> list[tuple[float, int]]:
    total, count = token_losses(outputs.logits, inputs["labels"])
    return [(float(t), int(c)) for t, c in zip(total.cpu(), count.cpu(), strict=True)]


def references(batch: dict[str, Any]) -> list[None]:
    return [None] * len(batch["input_ids"])


def compute_metrics(preds: list[Any], refs: list[Any], labels: list[str]) -> dict[str, Any]:
    """Loss per response token over the whole split, and its exponential, perplexity."""
    total = sum(p[0] for p in preds)
    tokens = sum(p[1] for p in preds)
    loss = total / tokens if tokens else float("nan")
    return {"token_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": tokens}


def describe(row: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    total, count = row["prediction"]
    return {
        "source": row["source"],
        "line": row["line"],
        "response_tokens": count,
        "token_loss": round(total / count, 6) if count else None,
    }


def columns(data: DataConfig) -> dict[str, str]:
    return {}  # three row formats: each row is checked (and quarantined with a reason)


# ----------------------------------------------------------- checks and generations


def check_packing(engine: Any, cfg: RayftConfig) -> None:
    """With `data.packing`, make sure the model keeps packed examples apart: the second of
    two packed examples must get the logits it gets alone. Every rank runs it (ZeRO-3
    gathers weights collectively)."""
    if not cfg.data.packing:
        return
    generator = torch.Generator().manual_seed(0)
    vocab = engine.module.config.vocab_size
    a, b = (
        torch.randint(5, vocab, (1, 6), generator=generator),
        torch.randint(5, vocab, (1, 5), generator=generator),
    )
    packed = torch.cat([a, b], dim=1).to(engine.device)
    positions = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(engine.device)
    with torch.no_grad():
        together = engine(input_ids=packed, position_ids=positions).logits[0, 6:].float()
        alone = (
            engine(input_ids=b.to(engine.device), position_ids=positions[:, 6:]).logits[0].float()
        )
    gap = float((together - alone).abs().max())
    if gap > 1e-3 * max(1.0, float(alone.abs().max())):
        raise ValueError(
            f"data.packing: model type '{engine.module.config.model_type}' lets packed "
            f"examples attend to each other (logits differ by {gap:.3g}); set "
            "data.packing=false"
        )


def sample_prompts(rows: list[dict[str, Any]], tokenizer: Any, cfg: RayftConfig) -> list[dict]:
    """Eval rows -> what the model is asked at the end (the conversation up to its last
    assistant turn) and the answer the data gives."""
    prompts = []
    for row in rows:
        turns = json.loads(row["messages"])
        reference = next(t["content"] for t in reversed(turns) if t["role"] == "assistant")
        prompts.append(
            {
                "source": row["_source"],
                "line": int(row["_line"]),
                "prompt": prompt_text(turns, tokenizer, cfg.data),
                "reference": reference,
            }
        )
    return prompts


def prompt_ids(prompt: str, tokenizer: Any, cfg: RayftConfig) -> list[int]:
    """A prompt's token ids as generation reads them: BOS when the tokenizer adds one, and
    only the end of a prompt too long to leave room for `generate.max_new_tokens`."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
    ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids[-max(1, max_tokens(cfg) - cfg.generate.max_new_tokens) :]


def generate(engine: Any, prompts: list[dict], tokenizer: Any, cfg: RayftConfig) -> list[dict]:
    """Greedy answers to `prompts`, on every rank in step (ZeRO-3 shards the weights, so
    each forward is collective: `synced_gpus` keeps ranks going until all are done)."""
    import torch.distributed as dist

    model = engine.module
    model.eval()
    synced = engine.zero_optimization_stage() == 3 and dist.get_world_size() > 1
    answers = []
    for sample in prompts:
        input_ids = torch.tensor(
            [prompt_ids(sample["prompt"], tokenizer, cfg)], device=engine.device
        )
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=cfg.generate.max_new_tokens,
                do_sample=False,
                synced_gpus=synced,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        text = tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
        answers.append({**sample, "generation": text})
    return answers


def generate_rows(
    model: Any, batch: dict[str, np.ndarray], tokenizer: Any, cfg: RayftConfig
) -> list[str]:
    """`rayft predict`: greedy answers to a batch of rows at once, prompts built as
    `sample_prompts` builds them and padded on the left (generation continues every row
    from its last token; positions follow the attention mask)."""
    prompts = [
        prompt_ids(generation_prompt(json.loads(m), tokenizer, cfg.data), tokenizer, cfg)
        for m in batch["messages"]
    ]
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=cfg.generate.max_new_tokens,
            do_sample=False,
            use_cache=True,  # the export keeps training's use_cache=False in its config
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def present(prediction: Any, row: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    return {"generation": prediction}


TASK = Task(
    name="causal_lm",
    fields={"text": pa.string(), "messages": pa.string()},
    text_fields=("text",),
    near_dedup_default=False,
    extract=extract,
    label_field=None,
    tokenize=tokenize,
    collate=collate,
    auto_class=auto_class,
    model_kwargs=model_kwargs,
    predict=predict,
    references=references,
    compute_metrics=compute_metrics,
    describe=describe,
    peft_task_type="CAUSAL_LM",
    columns=columns,
    baseline=None,
    metric_names=("perplexity", "token_loss"),
    rewritable_fields=(),  # responses keep their layout (code, lists, newlines)
    windowed=True,  # packing makes one sequence of several rows: counted when prepared
    check_model=check_packing,
    sample_prompts=sample_prompts,
    generate=generate,
    extract_inputs=extract_inputs,
    present=present,
    prediction_columns=("generation",),
    generate_rows=generate_rows,
)
