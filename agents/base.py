"""The policy interface: a batch of observations and their episode contexts in, a batch of actions out.

Any object with ``act(observations, contexts) -> actions`` fits (a plain function too, via
`as_policy`); ``reset(context)`` is called at the start of each episode when present.
Text-mode policies return strings (model turns) or `Generation` records (a model turn with
the token ids and log-probs behind it, which `agents.rollout` assembles into training
sequences); structured-mode policies return the env's numeric action vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable


@dataclass
class EpisodeContext:
    """What a policy may know about one running episode: its reset info and its history.

    `history` alternates observations and the policy's own actions: ``[obs0, act0, obs1, ...]``;
    the observation being acted on is passed separately and appended afterwards.
    """

    slot: int
    reset_info: dict[str, Any]
    history: list[Any] = field(default_factory=list)
    step_infos: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    """Scratch space the policy keeps for this episode (a VLM keeps its conversation and token ids here)."""

    @property
    def sample_id(self) -> str:
        return self.reset_info["sample_id"]

    @property
    def turn(self) -> int:
        """How many actions the policy has taken in this episode."""
        return len(self.history) // 2


@dataclass
class Generation:
    """One model turn with the tokens behind it, as a language-model policy returns it.

    `text` is the turn the environment reads. `prompt_ids` are the tokens appended to the
    model's context before this turn (the whole first prompt at turn 0, then the end of the
    previous turn and the new observation) and `token_ids` the tokens the model generated,
    with `logprobs` their log-probabilities under the sampling policy (one per generated
    token). Concatenating ``prompt_ids + token_ids`` over the turns of an episode gives the
    exact token sequence the policy was conditioned on, with no re-tokenization.
    """

    text: str
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.logprobs and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"got {len(self.logprobs)} log-probs for {len(self.token_ids)} generated tokens")


def action_of(output: Any) -> Any:
    """The environment action in a policy output: the text of a `Generation`, else the output itself."""
    return output.text if isinstance(output, Generation) else output


@runtime_checkable
class Policy(Protocol):
    def act(self, observations: Sequence[Any], contexts: Sequence[EpisodeContext]) -> list[Any]: ...


class _FunctionPolicy:
    def __init__(self, fn: Callable[[Sequence[Any], Sequence[EpisodeContext]], list[Any]]) -> None:
        self.fn = fn

    def act(self, observations: Sequence[Any], contexts: Sequence[EpisodeContext]) -> list[Any]:
        return list(self.fn(observations, contexts))


def as_policy(obj: Any) -> Policy:
    """Return `obj` if it is a policy, wrap it if it is a callable ``f(observations, contexts)``."""
    if isinstance(obj, Policy):
        return obj
    if callable(obj):
        return _FunctionPolicy(obj)
    raise TypeError(f"a policy needs act(observations, contexts) or must be callable, got {type(obj).__name__}")
