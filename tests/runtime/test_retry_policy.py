"""Unit tests of the pure retry-policy and duration helpers (SPEC 3 durations, SPEC 4 retries)."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from sandbox._durations import MAX_SLEEP_SECONDS, DurationError, parse_duration, to_epoch
from sandbox._retry import (
    DEFAULT_TIMEOUT_SECONDS,
    RetryPolicy,
    RetryPolicyError,
    merge_retry_policy,
    parse_timeout,
)

# ---------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (2.5, 2.5),
        (dt.timedelta(minutes=2), 120.0),
        (dt.timedelta(0), 0.0),
        ("1 second", 1.0),
        ("1 seconds", 1.0),
        ("10 seconds", 10.0),
        ("2 second", 2.0),
        ("1 minute", 60.0),
        ("3 minutes", 180.0),
        ("1 hour", 3600.0),
        ("24 hours", 86400.0),
        ("1 day", 86400.0),
        ("365 days", 365 * 86400.0),
        ("1 week", 604800.0),
        ("2 weeks", 1209600.0),
        ("1.5 hours", 5400.0),
        ("0 seconds", 0.0),
    ],
)
def test_parse_duration_accepts_the_three_forms(value, seconds):
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        None,
        [1],
        {"seconds": 1},
        dt.timedelta(seconds=-1),
        "",
        "soon",
        "10",
        "ten seconds",
        "10 fortnights",
        "10 secs",
        "-5 seconds",
        "5 seconds ago",
        "1 hour 5 minutes",
    ],
)
def test_parse_duration_refuses_invalid_values(value):
    with pytest.raises(DurationError) as info:
        parse_duration(value)
    assert isinstance(info.value, ValueError)
    assert str(info.value)


def test_parse_duration_error_names_what_was_parsed():
    with pytest.raises(DurationError, match="sleep duration"):
        parse_duration("nope", what="sleep duration")


def test_max_sleep_is_365_days():
    assert MAX_SLEEP_SECONDS == 365 * 24 * 3600
    assert parse_duration("365 days") == MAX_SLEEP_SECONDS
    assert parse_duration("52 weeks") < MAX_SLEEP_SECONDS


def test_to_epoch_accepts_datetimes_and_numbers():
    aware = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert to_epoch(aware) == aware.timestamp()
    other_zone = aware.astimezone(dt.timezone(dt.timedelta(hours=5)))
    assert to_epoch(other_zone) == aware.timestamp()
    # a naive datetime is taken as UTC
    assert to_epoch(dt.datetime(2024, 1, 2, 3, 4, 5)) == aware.timestamp()
    assert to_epoch(1_700_000_000) == 1_700_000_000.0
    assert to_epoch(1_700_000_000.5) == 1_700_000_000.5


@pytest.mark.parametrize(
    "value", [True, math.nan, math.inf, "2024-01-01", None, dt.date(2024, 1, 1)]
)
def test_to_epoch_refuses_other_values(value):
    with pytest.raises(DurationError):
        to_epoch(value)


# ---------------------------------------------------------------------------- retry policy


def test_default_policy_matches_spec():
    policy = merge_retry_policy(None)
    assert policy == RetryPolicy()
    assert (policy.limit, policy.delay, policy.backoff) == (5, 10.0, "exponential")
    assert policy.as_config() == {"limit": 5, "delay": 10.0, "backoff": "exponential"}
    # limit 5 means up to 6 attempts
    assert all(policy.allows(n) for n in range(2, 7))
    assert not policy.allows(7)
    assert DEFAULT_TIMEOUT_SECONDS == 600.0
    assert parse_timeout(None) == 600.0


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        ("constant", [3.0, 3.0, 3.0, 3.0, 3.0]),
        ("linear", [3.0, 6.0, 9.0, 12.0, 15.0]),
        ("exponential", [3.0, 6.0, 12.0, 24.0, 48.0]),
    ],
)
def test_backoff_delays_before_attempt_n_plus_1(backoff, expected):
    policy = merge_retry_policy({"limit": 5, "delay": 3, "backoff": backoff})
    # after attempt n fails, the delay before attempt n+1
    delays = [policy.delay_before(n + 1) for n in range(1, 6)]
    assert delays == pytest.approx(expected)


def test_default_exponential_delays_are_10_20_40_80_160():
    policy = RetryPolicy()
    assert [policy.delay_before(n) for n in range(2, 7)] == [10.0, 20.0, 40.0, 80.0, 160.0]


@pytest.mark.parametrize(
    ("partial", "expected"),
    [
        ({}, (5, 10.0, "exponential")),
        ({"limit": 2}, (2, 10.0, "exponential")),
        ({"limit": 0}, (0, 10.0, "exponential")),
        ({"delay": "1 minute"}, (5, 60.0, "exponential")),
        ({"delay": 0}, (5, 0.0, "exponential")),
        ({"delay": dt.timedelta(seconds=7)}, (5, 7.0, "exponential")),
        ({"backoff": "linear"}, (5, 10.0, "linear")),
        ({"backoff": "constant", "limit": 1}, (1, 10.0, "constant")),
        ({"limit": 3, "delay": "1 second", "backoff": "exponential"}, (3, 1.0, "exponential")),
    ],
)
def test_partial_retries_merge_over_defaults(partial, expected):
    policy = merge_retry_policy(partial)
    assert (policy.limit, policy.delay, policy.backoff) == expected


def test_limit_zero_allows_a_single_attempt():
    policy = merge_retry_policy({"limit": 0})
    assert not policy.allows(2)


@pytest.mark.parametrize(
    "retries",
    [
        "3",
        3,
        ["limit", 3],
        {"limit": -1},
        {"limit": 1.5},
        {"limit": "3"},
        {"limit": True},
        {"limit": None},
        {"delay": "soon"},
        {"delay": -1},
        {"delay": math.nan},
        {"backoff": "quadratic"},
        {"backoff": None},
        {"tries": 3},
        {"limit": 3, "jitter": True},
    ],
)
def test_invalid_retries_are_refused(retries):
    with pytest.raises(RetryPolicyError) as info:
        merge_retry_policy(retries)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30 seconds", 30.0),
        (45, 45.0),
        (0.5, 0.5),
        (dt.timedelta(minutes=1), 60.0),
        ("1 hour", 3600.0),
    ],
)
def test_parse_timeout(value, seconds):
    assert parse_timeout(value) == seconds


@pytest.mark.parametrize("value", [0, "0 seconds", -1, "forever", True, math.inf, [30]])
def test_parse_timeout_refuses_zero_and_invalid(value):
    with pytest.raises(RetryPolicyError):
        parse_timeout(value)
