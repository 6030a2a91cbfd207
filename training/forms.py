"""Forms of the ML staff pages. They parse what the browser sends into the types the round
service expects; ``rounds.round_config_clean`` stays the one judge of what a round may be
configured with (the API goes through it too), and its complaints are shown on the fields
they name.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from django import forms

from training.models import RunKind, RunStatus
from training.services import rounds

# Settings whose values are a closed set: the form offers only these (the service checks).
CHOICES: dict[str, tuple[str, ...]] = {
    "algorithm": rounds.ALGORITHMS,
    "strategy": rounds.STRATEGIES,
}


def split_service_error(message: str, names: Collection[str]) -> list[tuple[str | None, str]]:
    """A service's ``"invalid round config: kl_coef: must be positive; seed: ..."`` as
    ``[("kl_coef", "must be positive"), ("seed", ...)]``; a part that names none of ``names``
    comes back whole with ``None``."""
    parts: list[tuple[str | None, str]] = []
    for part in (p.strip() for p in message.split(";")):
        if not part:
            continue
        tokens = part.split(": ")
        for i, token in enumerate(tokens[:-1]):
            if token.strip() in names:
                parts.append((token.strip(), ": ".join(tokens[i + 1 :])))
                break
        else:
            parts.append((None, part))
    return parts


# Labels where the setting's name, capitalised, reads badly.
LABELS = {
    "kl_coef": "KL coefficient",
    "lora": "LoRA",
    "lora_top_layers": "LoRA top layers",
    "num_samples": "Samples per prompt",
    "max_new_tokens": "Max new tokens",
}


def _field_for(name: str, kind: Any, default: Any, help_text: str) -> forms.Field:
    label = LABELS.get(name) or name.replace("_", " ").capitalize()
    choices = CHOICES.get(name)
    if isinstance(kind, tuple | list) and all(isinstance(c, str) for c in kind):
        choices = tuple(kind)
    if choices:
        return forms.ChoiceField(
            label=label, choices=[(c, c) for c in choices], initial=default, help_text=help_text
        )
    if kind is bool:
        return forms.BooleanField(label=label, required=False, initial=default, help_text=help_text)
    if kind is int:
        return forms.IntegerField(label=label, initial=default, help_text=help_text)
    if kind is float or kind == (int, float):
        return forms.FloatField(label=label, initial=default, help_text=help_text)
    # Strings: blank means "the default" (a model path the operator did not want to change).
    return forms.CharField(
        label=label, required=False, initial=default, help_text=help_text, max_length=1024
    )


class RoundConfigForm(forms.Form):
    """One field per entry of ``rounds.ROUND_CONFIG_FIELDS``, in its order, with its default
    and help. ``initial_config`` (a schedule's saved settings) overrides the defaults."""

    def __init__(
        self,
        *args: Any,
        initial_config: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        saved = dict(initial_config or {})
        for name, (kind, default, help_text) in rounds.ROUND_CONFIG_FIELDS.items():
            field = _field_for(name, kind, default, help_text)
            if name in saved:
                field.initial = saved[name]
            self.fields[name] = field

    def config(self) -> dict[str, Any]:
        """The round settings typed in: blank text fields are left out, so the service fills
        in their defaults."""
        return {
            name: value
            for name, value in self.cleaned_data.items()
            if name in rounds.ROUND_CONFIG_FIELDS and not (isinstance(value, str) and not value)
        }

    def add_service_error(self, message: str) -> None:
        """Put the service's message on the fields it names (``name: problem; ...``); what
        names no field goes above the form."""
        for name, text in split_service_error(message, self.fields):
            self.add_error(name, text)


class ScheduleForm(forms.Form):
    enabled = forms.BooleanField(required=False, help_text="Start rounds by themselves.")
    min_new_judgments = forms.IntegerField(
        min_value=1,
        max_value=10_000_000,
        label="New judgments",
        help_text="A round starts once the campaign has this many judgments since its last round.",
    )


class RunFilterForm(forms.Form):
    """The filters of the runs list; every value is checked against its allowlist."""

    campaign = forms.ChoiceField(required=False)
    kind = forms.ChoiceField(required=False, choices=[("", "any kind"), *RunKind.choices])
    status = forms.ChoiceField(required=False, choices=[("", "any status"), *RunStatus.choices])

    def __init__(self, *args: Any, campaigns: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["campaign"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [("", "every campaign"), *campaigns]


class CompareForm(forms.Form):
    a = forms.IntegerField(min_value=1, label="Version A")
    b = forms.IntegerField(min_value=1, label="Version B")
