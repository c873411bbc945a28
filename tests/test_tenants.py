"""The tenant gate (``serve_apps/tenants.py``) on a hand-driven clock: keys,
visibility, requests/tokens per minute and concurrency, without Ray. The
same gate runs in the front door; ``tests/test_front_door.py`` checks it
end to end."""

from __future__ import annotations

import hmac
import re

import pytest

from cluster.catalog import Catalog, CatalogError, TenantSpec, load_catalog
from cluster.errors import RateLimitedError, UnauthorizedError
from serve_apps import tenants as tenants_module
from serve_apps.tenants import WINDOW_S, TenantGate

MODELS = [{"name": n, "path": f"/p/{n}", "family": "f"} for n in ("a", "b", "c")]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate(tenants: dict, environ: dict | None = None) -> tuple[TenantGate, Clock]:
    cat = Catalog.model_validate({"models": MODELS, "tenants": tenants})
    clock = Clock()
    return TenantGate(cat.tenants, environ or {}, clock), clock


def test_no_tenants_means_no_keys_no_limits_every_model():
    g, _ = gate({})
    assert not g.enabled
    assert g.authenticate(None) is None and g.authenticate("Bearer whatever") is None
    assert g.sees(None, "a") and g.admit(None) is None
    g.release(None, 10**9)  # nothing to count


def test_keys_from_the_catalog_and_the_environment_name_their_tenant():
    g, _ = gate({"inline": {"key": "k-inline"}, "env": {"key_env": "SHOAL_KEY_T"}},
                environ={"SHOAL_KEY_T": "k-from-env"})
    assert g.authenticate("Bearer k-inline").name == "inline"
    assert g.authenticate("bearer   k-from-env ").name == "env"  # scheme is case-blind
    for bad in ("Bearer k-inline-", "Bearer k-inlin", "Bearer ", "Basic k-inline", "k-inline"):
        with pytest.raises(UnauthorizedError) as e:
            g.authenticate(bad)
        assert e.value.status == 401 and "k-inline" not in str(e.value)
    with pytest.raises(UnauthorizedError, match="needs an API key"):
        g.authenticate(None)  # no anonymous tenant: a key is required


def test_an_unset_key_env_is_a_catalog_error_naming_the_field():
    cat = Catalog.model_validate({"models": MODELS,
                                  "tenants": {"team-a": {"key_env": "SHOAL_KEY_TEAM_A"}}})
    with pytest.raises(CatalogError, match=r"tenants\.team-a\.key_env: .*SHOAL_KEY_TEAM_A"):
        TenantGate(cat.tenants, {})


def test_anonymous_takes_requests_without_a_header_but_never_a_wrong_key():
    g, _ = gate({"anon": {"anonymous": True, "models": ["a"]}, "team": {"key": "k1"}})
    assert g.authenticate(None).name == "anon"
    with pytest.raises(UnauthorizedError):
        g.authenticate("Bearer unused")  # a wrong key is not "no key"


def test_every_key_is_compared_in_constant_time(monkeypatch):
    """Each authenticate compares the digest against every tenant's digest
    with hmac.compare_digest, whichever matches (no early exit, no dict
    lookup on the key)."""
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)
    monkeypatch.setattr(tenants_module.hmac, "compare_digest", spy)
    g, _ = gate({f"t{i}": {"key": f"key-{i}"} for i in range(5)})
    assert g.authenticate("Bearer key-0").name == "t0"
    assert calls == [(32, 32)] * 5  # SHA-256 digests: lengths say nothing either
    calls.clear()
    with pytest.raises(UnauthorizedError):
        g.authenticate("Bearer x")
    assert len(calls) == 5
    assert not any("key-" in repr(v) for v in vars(g).values())  # only digests are kept


def test_a_restricted_tenant_sees_only_its_models():
    g, _ = gate({"small": {"key": "k", "models": ["a", "c"]}, "all": {"key": "k2"}})
    small, every = g.authenticate("Bearer k"), g.authenticate("Bearer k2")
    assert [m for m in "abc" if g.sees(small, m)] == ["a", "c"]
    assert [m for m in "abc" if g.sees(every, m)] == ["a", "b", "c"]


def test_requests_per_minute_is_a_sliding_window_with_retry_after():
    g, clock = gate({"t": {"key": "k", "requests_per_minute": 3}})
    t = g.authenticate("Bearer k")
    for dt in (0, 10, 20):
        clock.now += dt
        g.release(g.admit(t))
    with pytest.raises(RateLimitedError) as e:
        g.admit(t)
    assert e.value.status == 429 and e.value.retry_after_s == 30  # the first leaves at +60
    assert g.inflight("t") == 0  # a refusal counts nothing
    clock.now += 30  # the first admission is now 60 s old
    g.release(g.admit(t))
    with pytest.raises(RateLimitedError):
        g.admit(t)


def test_tokens_per_minute_refuses_the_next_request_once_over_budget():
    g, clock = gate({"t": {"key": "k", "tokens_per_minute": 100}})
    t = g.authenticate("Bearer k")
    first = g.admit(t)
    second = g.admit(t)  # admitted while the first runs: its tokens are not known yet
    g.release(first, 70)
    clock.now += 5
    g.release(second, 50)  # the window is now over budget (120)
    with pytest.raises(RateLimitedError) as e:
        g.admit(t)
    # 70 expire at +60 from the first release, leaving 50 < 100
    assert e.value.retry_after_s == 55
    clock.now += 55
    g.release(g.admit(t), 10)


def test_concurrency_is_released_once_per_ticket():
    g, _ = gate({"t": {"key": "k", "max_concurrent": 2}, "u": {"key": "k2",
                                                          "max_concurrent": 1}})
    t, u = g.authenticate("Bearer k"), g.authenticate("Bearer k2")
    one, two = g.admit(t), g.admit(t)
    assert g.admit(u) is not None  # another tenant's slots are its own
    with pytest.raises(RateLimitedError, match="in flight") as e:
        g.admit(t)
    assert e.value.retry_after_s >= 1
    g.release(one)
    g.release(one)  # a second release of the same ticket frees nothing more
    assert g.inflight("t") == 1
    three = g.admit(t)
    with pytest.raises(RateLimitedError):
        g.admit(t)
    g.release(two), g.release(three)
    assert g.inflight("t") == 0


def test_window_forgets_after_a_minute():
    g, clock = gate({"t": {"key": "k", "requests_per_minute": 1, "tokens_per_minute": 5}})
    t = g.authenticate("Bearer k")
    g.release(g.admit(t), 50)
    clock.now += WINDOW_S
    g.release(g.admit(t), 1)


@pytest.mark.parametrize("bad, field", [
    ({"tenants": {"team-a": {"key": "k", "models": ["nope"]}}},
     "tenants.team-a.models.0: unknown model 'nope'"),
    ({"tenants": {"team-a": {}}}, "tenants.team-a: Value error, give exactly one of"),
    ({"tenants": {"team-a": {"key": "k", "key_env": "E"}}}, "tenants.team-a: Value error, give exactly one of"),
    ({"tenants": {"team-a": {"anonymous": True, "key": "k"}}}, "tenants.team-a: Value error, give exactly one of"),
    ({"tenants": {"team-a": {"key": "k", "tokens_per_minute": 0}}},
     "tenants.team-a.tokens_per_minute"),
    ({"tenants": {"team-a": {"key": "k", "max_concurent": 1}}}, "tenants.team-a.max_concurent"),
    ({"tenants": {"team-a": {"key_env": "1BAD"}}}, "tenants.team-a.key_env"),
    ({"tenants": {"a": {"anonymous": True}, "b": {"anonymous": True}}}, "only one tenant"),
    ({"tenants": {"a": {"key": "same"}, "b": {"key": "same"}}}, "share a key"),
    ({"tenants": {"a b": {"key": "k"}}}, "tenants.a b: a tenant name"),
])
def test_bad_tenant_config_names_the_field(bad, field):
    with pytest.raises(CatalogError, match=re.escape(field)) as e:
        load_catalog({"models": MODELS, **bad})
    assert "'same'" not in str(e.value)  # a key is never echoed in the error


def test_a_key_given_inline_is_masked_in_repr_but_reaches_the_app():
    spec = TenantSpec(key="s3cret")
    assert "s3cret" not in repr(spec)
    dumped = Catalog.model_validate({"tenants": {"t": {"key": "s3cret"}}}).model_dump(mode="json")
    assert Catalog.model_validate(dumped).tenants["t"].resolve_key("t") == "s3cret"
    assert "tenants" not in Catalog.model_validate(dumped).without_tenants().model_dump(
        exclude_defaults=True)


def test_the_commented_example_in_the_shipped_catalog_is_valid():
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[1] / "ray_configs" / "models.yaml").read_text()
    block = text[text.index("# tenants:"):]
    example = yaml.safe_load("\n".join(line[2:] for line in block.splitlines()))
    cat = load_catalog({**yaml.safe_load(text), **example})
    assert cat.tenants["team-a"].key_env == "SHOAL_KEY_TEAM_A" and cat.tenants["public"].anonymous
    g = TenantGate(cat.tenants, {"SHOAL_KEY_TEAM_A": "k"})
    assert g.authenticate(None).name == "public"


def test_admin_key_is_constant_time_and_closes_admin_routes_when_tenants_have_none():
    from serve_apps.tenants import AdminKey

    key = AdminKey("adm-1", tenants_configured=True)
    assert key.allows("Bearer adm-1") and key.allows("bearer adm-1")
    assert not any(key.allows(h) for h in (None, "", "Bearer adm-", "Bearer adm-12", "adm-1"))
    assert AdminKey(None, tenants_configured=False).allows(None)  # as before tenants: open
    assert not AdminKey(None, tenants_configured=True).allows("Bearer anything")
