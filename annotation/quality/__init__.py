"""Agreement, rater reliability and bias figures for preference judgments: pure functions.

No Django and no torch: a selector turns judgments into the plain records here, these
functions turn records into numbers, and a view shows the numbers. Choices are the strings
"a", "b", "tie" and "both_bad" (canonical A/B terms, not screen sides). Wherever a rating's
value is ``None`` it is missing and ignored.

- ``agreement``: raw agreement, Cohen's kappa, Krippendorff's alpha, the campaign report.
- ``dawid_skene``: latent-class rater reliability and the training weight it implies.
- ``raters``: position, length, tie and speed figures per rater, and the flags they raise.
- ``stats``: bootstrap intervals, the critique-experiment uplift, binomial test, Spearman.
"""

from annotation.quality.agreement import (
    CHOICES,
    AgreementReport,
    ChoiceRating,
    Level,
    PairKappa,
    Rating,
    agreement_report,
    cohens_kappa,
    krippendorff_alpha,
    ordinal_value,
    pairwise_kappas,
    raw_agreement,
)
from annotation.quality.dawid_skene import DawidSkeneResult, dawid_skene, judgment_weight
from annotation.quality.raters import (
    FlagThresholds,
    JudgmentRecord,
    RaterStats,
    campaign_stats,
    rater_flags,
    rater_stats,
)
from annotation.quality.stats import Uplift, binomial_p_value, bootstrap_ci, spearman, uplift

__all__ = [
    "CHOICES",
    "AgreementReport",
    "ChoiceRating",
    "DawidSkeneResult",
    "FlagThresholds",
    "JudgmentRecord",
    "Level",
    "PairKappa",
    "RaterStats",
    "Rating",
    "Uplift",
    "agreement_report",
    "binomial_p_value",
    "bootstrap_ci",
    "campaign_stats",
    "cohens_kappa",
    "dawid_skene",
    "judgment_weight",
    "krippendorff_alpha",
    "ordinal_value",
    "pairwise_kappas",
    "rater_flags",
    "rater_stats",
    "raw_agreement",
    "spearman",
    "uplift",
]
