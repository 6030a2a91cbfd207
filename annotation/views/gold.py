"""The campaign admin's gold page: generate gold items, see how raters do on them."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from annotation import permissions, selectors
from annotation.exceptions import AnnotationError, InvalidJudgment
from annotation.forms import GoldGenerateForm
from annotation.models import Role
from annotation.services.gold import gold_generate


@require_http_methods(["GET", "POST"])
@login_required
def campaign_gold(request: HttpRequest, slug: str) -> HttpResponse:
    campaign = permissions.campaign_for(user=request.user, slug=slug, roles=(Role.ADMIN,))
    form = GoldGenerateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            report = gold_generate(
                campaign=campaign,
                count=data["count"],
                kinds=data["kinds"],
                planted_errors=data["planted_errors"],
                source_name=data["source_name"],
                seed=data["seed"],
            )
        except InvalidJudgment as exc:
            form.add_error(exc.field if exc.field in form.fields else None, exc.message)
        except AnnotationError as exc:
            form.add_error(None, exc.message)
        else:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(report.by_kind.items()))
            messages.success(
                request,
                f"Made {report.created} gold item{'s' if report.created != 1 else ''}"
                + (f" ({kinds})" if kinds else "")
                + f" from {report.tried} answer{'s' if report.tried != 1 else ''} tried.",
            )
            return redirect("annotation:campaign_gold", slug=campaign.slug)
    return render(
        request,
        "annotation/campaign_gold.html",
        {
            "campaign": campaign,
            "form": form,
            "tab": "gold",
            "summary": selectors.gold_summary(campaign=campaign),
        },
        status=400 if form.errors else 200,
    )
