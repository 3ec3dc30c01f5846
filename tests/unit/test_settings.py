"""Settings from the environment: typed, defaults as documented, and every error names its variable."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest

from api.settings import ENV_VARS, ConfigurationError, Settings

KEY = base64.b64encode(b"h" * 32).decode()


def from_env(**env: str) -> Settings:
    return Settings.from_env({"ECHOTRANSACT_HASH_KEY": KEY, **env})


def test_defaults_are_the_documented_ones() -> None:
    settings = from_env()
    assert (settings.port, settings.link_lifetime, settings.rate_limit_per_minute) == (8000, timedelta(minutes=15), 600)
    assert settings.identity_thresholds_minor["USD"] == 10_000
    assert settings.database_url is None and settings.sms == {}
    assert settings.retention_policy.velocity_window == timedelta(minutes=settings.risk_policy.velocity_window_minutes)


def test_values_are_parsed_into_their_types() -> None:
    settings = from_env(ECHOTRANSACT_PORT="0", ECHOTRANSACT_LINK_LIFETIME_S="60", DATABASE_URL="postgresql://x/y",
                        ECHOTRANSACT_IDENTITY_THRESHOLDS="USD=5000", ECHOTRANSACT_ALLOW_PRIVATE_DESTINATIONS="1",
                        ECHOTRANSACT_RISK_RULES="velocity_window_minutes=30", ECHOTRANSACT_SMS_URL="https://sms",
                        ECHOTRANSACT_PROCESSORS="primary=http://a,secondary=https://b")
    assert (settings.port, settings.link_lifetime, settings.database_url) == (0, timedelta(seconds=60), "postgresql://x/y")
    assert settings.identity_thresholds_minor["USD"] == 5_000 and settings.allow_private_destinations
    assert settings.retention_policy.velocity_window == timedelta(minutes=30)
    assert settings.sms == {"url": "https://sms"}
    assert settings.processors == {"primary": "http://a", "secondary": "https://b"}


@pytest.mark.parametrize(("name", "value", "says"), [
    ("ECHOTRANSACT_PORT", "abc", "valid integer"),
    ("ECHOTRANSACT_PORT", "70000", "65535"),
    ("ECHOTRANSACT_LINK_LIFETIME_S", "0", "positive"),
    ("ECHOTRANSACT_CATCH_UP_EVERY_S", "nan", "finite"),
    ("ECHOTRANSACT_TOPIC_PREFIX", "a b", "pattern"),
    ("ECHOTRANSACT_IDENTITY_THRESHOLDS", "USD=x", "CURRENCY=MINOR_UNITS"),
    ("ECHOTRANSACT_RISK_RULES", "review_score=90,decline_score=80", "review_score"),
    ("ECHOTRANSACT_RETENTION", "sms_after=0d", "positive"),
    ("ECHOTRANSACT_PROCESSORS", "primary=http://a", "exactly two"),
    ("ECHOTRANSACT_VAULT_KEY", "not base64!", "base64"),
])
def test_a_bad_value_is_refused_naming_its_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=name) as refused:
        from_env(**{name: value})
    assert says in str(refused.value)


def test_keys_are_never_echoed_in_an_error() -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env({"ECHOTRANSACT_HASH_KEY": "c2VjcmV0LXRoYXQtaXMtdG9vLXNob3J0"})
    assert "ECHOTRANSACT_HASH_KEY" in str(refused.value) and "c2VjcmV0" not in str(refused.value)


def test_the_hash_key_is_required_and_the_vault_key_must_differ_from_the_event_key() -> None:
    with pytest.raises(ConfigurationError, match="ECHOTRANSACT_HASH_KEY is required"):
        Settings.from_env({})
    with pytest.raises(ConfigurationError, match="must differ"):
        from_env(ECHOTRANSACT_VAULT_KEY=KEY, ECHOTRANSACT_ENCRYPTION_KEY=KEY)


def test_replace_validates_the_copy_like_the_original() -> None:
    settings = from_env()
    assert settings.replace(port=1234).port == 1234 and settings.port == 8000
    with pytest.raises(ConfigurationError, match="port"):
        settings.replace(port=-1)


def test_every_field_is_one_documented_variable() -> None:
    assert len(ENV_VARS) == len(Settings.model_fields) and all(ENV_VARS.values())
