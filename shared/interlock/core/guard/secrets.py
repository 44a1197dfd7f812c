"""Secret detection with the regex detectors of Yelp's ``detect-secrets``.

Only its pattern detectors are used (cloud keys, tokens, private keys, JWTs, credentials in
URLs): they are precise. Its entropy and keyword detectors are left out: run outputs are full of
hashes and ids, which they flag. Nothing goes over the network (no verification).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache

from ._text import Match


@cache
def patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    """(kind, pattern): each detector's own denylist. Imported on first use: detect-secrets
    takes a good part of a second to import, which a process without secret checks never pays."""
    from detect_secrets.plugins.artifactory import ArtifactoryDetector
    from detect_secrets.plugins.aws import AWSKeyDetector
    from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
    from detect_secrets.plugins.basic_auth import BasicAuthDetector
    from detect_secrets.plugins.discord import DiscordBotTokenDetector
    from detect_secrets.plugins.github_token import GitHubTokenDetector
    from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
    from detect_secrets.plugins.jwt import JwtTokenDetector
    from detect_secrets.plugins.mailchimp import MailchimpDetector
    from detect_secrets.plugins.npm import NpmDetector
    from detect_secrets.plugins.openai import OpenAIDetector
    from detect_secrets.plugins.private_key import PrivateKeyDetector
    from detect_secrets.plugins.pypi_token import PypiTokenDetector
    from detect_secrets.plugins.sendgrid import SendGridDetector
    from detect_secrets.plugins.slack import SlackDetector
    from detect_secrets.plugins.square_oauth import SquareOAuthDetector
    from detect_secrets.plugins.stripe import StripeDetector
    from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
    from detect_secrets.plugins.twilio import TwilioKeyDetector

    detectors = (
        AWSKeyDetector, AzureStorageKeyDetector, ArtifactoryDetector, BasicAuthDetector, DiscordBotTokenDetector,
        GitHubTokenDetector, GitLabTokenDetector, JwtTokenDetector, MailchimpDetector, NpmDetector, OpenAIDetector,
        PrivateKeyDetector, PypiTokenDetector, SendGridDetector, SlackDetector, SquareOAuthDetector, StripeDetector,
        TelegramBotTokenDetector, TwilioKeyDetector,
    )
    return tuple((str(cls.secret_type), pattern) for cls in detectors for pattern in cls.denylist)


def find_secrets(text: str, path: str) -> Iterator[Match]:
    """The secrets in ``text``: the kind is the detector's (``AWS Access Key``); the span is the
    secret itself (a detector's capture group where it has one, e.g. the password of a URL)."""
    for kind, pattern in patterns():
        for m in pattern.finditer(text):
            group = next((i for i in range(1, (pattern.groups or 0) + 1) if m.group(i)), 0)
            yield Match(kind, path, m.start(group), m.end(group), m.group(group))
