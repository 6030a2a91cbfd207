"""The REST API: one DRF class per operation, thin.

Each class parses input with its nested ``InputSerializer`` (an explicit allowlist: the server
sets rater, campaign, gold answers and timestamps), calls one service or selector, and formats
the result with its ``OutputSerializer``. Domain errors from ``annotation.exceptions`` become
HTTP answers that name the field.

Roles: the campaign in the URL is resolved together with the caller's roles in one query
(``CampaignRole``); a campaign where the caller has no role does not exist for them (404), one
where they hold another role is forbidden (403). The HTML views use the same rules
(``annotation.permissions``).

Authentication: ``Authorization: Token <key>`` for machines (no CSRF: a browser never sends
that header by itself), the session for the browser (CSRF enforced by DRF's
``SessionAuthentication`` on every unsafe method).

Raters speak in the terms they see: ``left`` / ``right`` / ``tie`` / ``both_bad``. The server
maps left / right to the canonical a / b with the slot's layout; a rater never learns which
completion is A, nor any model name or source.
"""

from annotation.api.auth import AuthTokenApi, AuthTokenCreateApi, AuthTokenDeleteApi
from annotation.api.base import (
    BaseApi,
    CampaignRole,
    CanCreateCampaigns,
    MethodRoutedApi,
    name_nested_serializers,
)
from annotation.api.campaigns import (
    CampaignCreateApi,
    CampaignDetailApi,
    CampaignGetApi,
    CampaignListApi,
    CampaignsApi,
    CampaignUpdateApi,
    MembershipAddApi,
)
from annotation.api.export import CampaignProgressApi, JudgmentExportApi
from annotation.api.gold import ComparisonGoldSetApi, GoldGenerateApi
from annotation.api.items import CampaignImportApi, ComparisonsBuildApi
from annotation.api.quality import CampaignQualityApi
from annotation.api.rankings import RankingLeaseApi, RankingSubmitApi, RankingTasksBuildApi
from annotation.api.rater import (
    JudgmentSubmitApi,
    SlotLeaseApi,
    SlotReleaseApi,
    fast_judgment_input,
    judgment_as_seen,
)

# Every API class is defined now: name their nested serializers for the OpenAPI schema.
name_nested_serializers()

__all__ = [
    "AuthTokenApi",
    "AuthTokenCreateApi",
    "AuthTokenDeleteApi",
    "BaseApi",
    "CampaignCreateApi",
    "CampaignDetailApi",
    "CampaignGetApi",
    "CampaignImportApi",
    "CampaignListApi",
    "CampaignProgressApi",
    "CampaignQualityApi",
    "CampaignRole",
    "CampaignUpdateApi",
    "CampaignsApi",
    "CanCreateCampaigns",
    "ComparisonGoldSetApi",
    "ComparisonsBuildApi",
    "GoldGenerateApi",
    "JudgmentExportApi",
    "JudgmentSubmitApi",
    "MembershipAddApi",
    "MethodRoutedApi",
    "RankingLeaseApi",
    "RankingSubmitApi",
    "RankingTasksBuildApi",
    "SlotLeaseApi",
    "SlotReleaseApi",
    "fast_judgment_input",
    "judgment_as_seen",
]
