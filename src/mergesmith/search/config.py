"""SEARCH.yml: mergekit-evolve's genome config (``genome``, ``tasks``, ``limit``, ...) read strictly, plus
mergesmith's own keys (``tasks_file`` / ``ppl_file`` fitness terms, ``held_out``, ``optimizer``,
``baseline``). Every problem is one ConfigError line naming the key; nothing is written before the whole
file has been checked (:func:`load_search_config` also checks that every named file exists)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, model_validator

from mergesmith.core.errors import ConfigError
from mergesmith.pipeline.config import Count, ModelRef, check_keys, did_you_mean, load_yaml_documents

#: Parameters the search varies when the method has them; per-model ones get one value per model.
SEARCHABLE = ("weight", "density", "t", "lambda")
#: The largest optimizer.population: a generation is evaluated whole, and its candidates are held at once.
MAX_POPULATION = 10_000
CMAES_MIN_POPULATION = 4


def searched_params(method: Any, normalize: bool | None = None) -> list:
    """The method's parameters that the search varies: those of :data:`SEARCHABLE` it takes, less a
    ``density`` its kernel ignores (task arithmetic keeps every entry, as in mergekit-evolve), and
    ``lambda`` unless the weights are normalized (``normalize``: then it is the only scale of the merged
    task vector; without normalizing, the weights already scale it)."""
    ignores_density = getattr(method.kernel, "sparsify", None) == "none"
    out = []
    for p in method.params:
        if p.name not in SEARCHABLE or (p.name == "density" and ignores_density):
            continue
        if p.name == "lambda" and not normalize:
            continue
        out.append(p)
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Genome(_Strict):
    """What is searched: mergekit-evolve's ``genome`` keys, same meaning."""

    models: list[ModelRef] = Field(min_length=1)
    merge_method: str
    base_model: ModelRef | None = None
    tokenizer_source: str | None = None
    layer_granularity: Count = Field(default=0, ge=0)  # 0: one value per model for the whole model
    normalize: bool | None = (
        None  # None: the method's default (mergekit-evolve: true for ties/dare_ties/linear)
    )
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False
    dtype: str | None = None  # ours: the merge's dtype (default: the models' own)


#: What a tasks_file term scores: greedy exact match, or the mean teacher-forced probability of the
#: whole answer (eval.tasks.score_answer_prob: smooth in the weights, and no generation).
TASK_METRICS = ("exact_match", "answer_prob")


class Task(_Strict):
    """One fitness term: an lm-eval task (``name`` + ``metric``), a tasks file or a text file."""

    name: str = Field(min_length=1)
    weight: FiniteFloat = 1.0
    # lm-eval: the metric it reports; tasks_file: exact_match (default) or answer_prob (see TASK_METRICS)
    metric: str | None = None
    tasks_file: str | None = None  # ours: exact-match accuracy on {"prompt", "answer"} lines
    ppl_file: str | None = None  # ours: -weight * ln(perplexity) on a text file
    limit: Count | None = Field(default=None, ge=1)  # prompts / lines scored per evaluation (the first N)

    @model_validator(mode="after")
    def _one_source(self):
        if self.tasks_file is not None and self.ppl_file is not None:
            raise ValueError(f"task {self.name!r}: give 'tasks_file' or 'ppl_file', not both")
        if self.metric is not None and self.ppl_file:
            raise ValueError(
                f"task {self.name!r}: 'metric' is for lm-eval tasks and tasks_file, not for ppl_file"
            )
        if self.metric == "answer_prob" and not self.tasks_file:
            raise ValueError(
                f"task {self.name!r}: metric answer_prob scores a tasks_file; this task has none"
            )
        if self.tasks_file and self.metric not in (None, *TASK_METRICS):
            raise ValueError(
                f"task {self.name!r}: a tasks_file's metric is one of {', '.join(TASK_METRICS)}, not {self.metric!r}"
            )
        return self

    @property
    def kind(self) -> Literal["tasks", "answer_prob", "ppl", "lm_eval"]:
        if self.tasks_file:
            return "answer_prob" if self.metric == "answer_prob" else "tasks"
        return "ppl" if self.ppl_file else "lm_eval"


class Optimizer(_Strict):
    """Ours: which maintained optimiser proposes candidates, and how."""

    name: Literal["cmaes", "random", "tpe"] = "cmaes"
    # CMA-ES step size, in units of each parameter's range
    sigma0: float = Field(default=1 / 6, gt=0, le=1, allow_inf_nan=False)
    # candidates per generation (default: CMA-ES's)
    population: Count | None = Field(default=None, ge=2, le=MAX_POPULATION)
    # starting point per parameter name (default: mergekit-evolve's: weight 1/len(models), density 1, t 0.5)
    init: dict[str, FiniteFloat] | None = None
    # search range per parameter name (default: weight [0, 2] or [-2, 2], density and t [0, 1])
    bounds: dict[str, tuple[FiniteFloat, FiniteFloat]] | None = None

    @model_validator(mode="after")
    def _cmaes_population(self):
        # with fewer than 4 candidates CMA-ES has one parent, and its covariance update divides by zero
        if self.name == "cmaes" and self.population is not None and self.population < CMAES_MIN_POPULATION:
            raise ValueError(
                f"CMA-ES needs a population of at least {CMAES_MIN_POPULATION}, got {self.population}; "
                "raise it, or use name: random"
            )
        return self


class SearchConfig(_Strict):
    genome: Genome
    tasks: list[Task] = Field(min_length=1)
    held_out: list[str] = []  # ours: tasks files scored once for the baseline and the best recipe
    optimizer: Optimizer = Optimizer()
    baseline: str | None = None  # ours: a hand-set merge config, the reference in the closing table
    # mergekit-evolve's top-level keys: `limit` is every task's default; the others go to lm-eval
    limit: Count | None = Field(default=None, ge=1)
    num_fewshot: Count | None = Field(default=None, ge=0)
    shuffle: bool = False
    random_init: bool = False  # start from a random point instead of init (seeded by --seed)
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True


_CHILDREN: dict[tuple[str, str], type[BaseModel]] = {
    ("SearchConfig", "genome"): Genome,
    ("SearchConfig", "optimizer"): Optimizer,
    ("SearchConfig", "tasks"): Task,
}


def parse_search_config(data: Any, source: str = "search config") -> SearchConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a search config must be a YAML mapping, got {type(data).__name__}")
    check_keys(data, SearchConfig, source, _CHILDREN, what="search config", unsupported={})
    try:
        config = SearchConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "required key is missing" if err["type"] == "missing" else str(err["msg"])
        where = f" at '{loc}'" if loc else ""
        msg = msg.removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
        raise ConfigError(f"{source}: invalid search config{where}: {msg}") from None
    _check_semantics(config, source)
    return config


def _check_semantics(config: SearchConfig, source: str) -> None:
    """What pydantic cannot see: the method and its parameters, ranges, names."""
    from mergesmith.methods import get_method

    g = config.genome
    method = get_method(g.merge_method)  # an unknown method: the registry's one-line error
    names = [t.name for t in config.tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{source}: task name {dup[0]!r} is used twice; give every task its own name")
    opt = config.optimizer
    for key in [*(opt.init or {}), *(opt.bounds or {})]:
        if key not in SEARCHABLE:
            raise ConfigError(
                f"{source}: optimizer: {key!r} is not a searched parameter{did_you_mean(key, SEARCHABLE)} "
                f"(searched: {', '.join(SEARCHABLE)})"
            )
    for key, (lo, hi) in (opt.bounds or {}).items():
        if not lo < hi:
            raise ConfigError(
                f"{source}: optimizer.bounds.{key}: the low end {lo} must be below the high end {hi}"
            )
        if key == "t" and (lo < 0 or hi > 1):
            raise ConfigError(f"{source}: optimizer.bounds.t: must lie within [0, 1], got [{lo}, {hi}]")
        if key == "density" and (lo <= 0 or hi > 1):
            raise ConfigError(
                f"{source}: optimizer.bounds.density: must lie within (0, 1] (a density of 0 keeps nothing), "
                f"got [{lo}, {hi}]"
            )
        if key == "weight" and lo < 0 and not g.allow_negative_weights:
            raise ConfigError(
                f"{source}: optimizer.bounds.weight: {lo} is negative; set genome.allow_negative_weights: true"
            )
    if not searched_params(method, True):
        raise ConfigError(
            f"{source}: genome.merge_method {g.merge_method!r} has none of the searched parameters "
            f"({', '.join(SEARCHABLE)}); pick a method such as ties, task_arithmetic, dare_ties or slerp"
        )
    if g.filters is not None and (not g.filters or any(not f for f in g.filters)):
        raise ConfigError(f"{source}: genome.filters: give non-empty names such as [self_attn, mlp]")
    if g.filters and len(set(g.filters)) != len(g.filters):
        raise ConfigError(f"{source}: genome.filters: a name is given twice")


def _missing(path: Path) -> str:
    """Why a file the config names cannot be read: a folder given for a file is not a missing file."""
    return "is a folder, not a file" if path.is_dir() else "does not exist"


def read_search_config(path: str | Path) -> SearchConfig:
    """Parse SEARCH.yml (syntax, keys, values); files are checked by :func:`check_files`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search config {path} {_missing(path)}; pass a SEARCH.yml file")
    docs, label = load_yaml_documents(path)  # the merge configs' reader: syntax, encoding, size
    if len(docs) != 1:
        raise ConfigError(f"{label}: a search config is one YAML document; this file has {len(docs)}")
    return parse_search_config(docs[0], label)


def check_files(config: SearchConfig) -> None:
    """Every file the search will read exists (models are checked when they are opened)."""
    for t in config.tasks:
        for key in ("tasks_file", "ppl_file"):
            value = getattr(t, key)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"task {t.name!r}: {key} {value} {_missing(Path(value))}")
    for f in config.held_out:
        if not Path(f).is_file():
            raise ConfigError(f"held_out: tasks file {f} {_missing(Path(f))}")
    if config.baseline is not None and not Path(config.baseline).is_file():
        raise ConfigError(f"baseline: merge config {config.baseline} {_missing(Path(config.baseline))}")
