"""Clean: normalisation, HTML, each quality rule, PII, safety hook, dedup, report, workers, atomicity."""

import dataclasses
import json
import random
from pathlib import Path

import pytest

from chatforge.config import CleanConfig
from chatforge.data import clean as clean_module
from chatforge.data.clean import clean, load_safety_filter, normalise_text
from chatforge.data.html import html_to_text
from chatforge.data.pii import luhn_ok, scrub_pii
from chatforge.data.quality import RULES, first_failure
from chatforge.errors import ChatforgeError, ConfigError, DataError

GOOD = "Our support team answers every question about orders, returns and shipping within one business day."


def prose(seed: int, n_words: int) -> str:
    """Deterministic filler prose from a fixed vocabulary (sentences of 8-15 words)."""
    rng = random.Random(seed)
    vocab = ["order", "parcel", "refund", "customer", "delivery", "warehouse", "address", "invoice", "return",
             "product", "quality", "service", "support", "tracking", "payment", "discount", "shipping",
             "account", "message", "request", "window", "kitchen", "garden", "lamp", "chair", "table",
             "blanket", "kettle", "basket", "mirror", "carpet", "shelf", "drawer", "pillow", "candle"]
    words: list[str] = []
    while len(words) < n_words:
        sentence = [rng.choice(vocab) for _ in range(rng.randint(8, 15))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        words.extend(sentence)
    return " ".join(words[:n_words])


def write_raw(path: Path, docs: list[dict]) -> Path:
    rows = [{"id": d.get("id", str(i)), "source": d.get("source", "test"), **d} for i, d in enumerate(docs)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_clean(tmp_path: Path, docs: list[dict], **cfg_fields) -> tuple[list[dict], dict]:
    cfg = CleanConfig(**{"workers": 1, **cfg_fields})
    raw = write_raw(tmp_path / "raw.jsonl", docs)
    report = clean(raw, tmp_path / "clean.jsonl", tmp_path / "clean_report.json", cfg)
    out = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text(encoding="utf-8").split("\n")[:-1]]
    assert json.loads((tmp_path / "clean_report.json").read_text(encoding="utf-8")) == report
    return out, report


# --------------------------------------------------------------------------- normalisation and HTML


def test_normalise_unicode_forms_and_control_characters():
    text = "Cafe\u0301 \ufb01ne\r\nline\rnext\ttab\x00\x07\x1b[0m\x85\ufeff\u200b end \ud800"
    assert normalise_text(text, "NFC") == "Café \ufb01ne\nline\nnext\ttab[0m end "
    assert normalise_text(text, "NFKC") == "Café fine\nline\nnext\ttab[0m end "
    assert normalise_text("Cafe\u0301", "none") == "Cafe\u0301"


def test_html_to_text_drops_scripts_styles_and_boilerplate_keeps_blocks():
    page = """<!doctype html><html><head><title>T</title><style>p { color: red }</style></head><body>
      <header><nav><a href="/">Home</a> | <a href="/shop">Shop</a></nav></header>
      <h1>Returns   policy</h1>
      <p>You can return <b>any</b> item
         within 30&nbsp;days.<br>Contact us &amp; we help.</p>
      <script>var tracking = "SECRET";</script><noscript>Enable JS</noscript>
      <ul><li>Step one</li><li> Step <i>two</i></li></ul>
      <table><tr><td>Size</td><td>M</td></tr></table>
      <pre>  keep
    indentation</pre>
      <aside>Related posts</aside><form>Search <input></form><footer>© Shop</footer>
    </body></html>"""
    assert html_to_text(page) == (
        "Returns policy\n\nYou can return any item within 30 days.\nContact us & we help.\n\n"
        "Step one\nStep two\n\nSize M\n\n  keep\n    indentation"
    )
    assert html_to_text("") == ""


def test_clean_extracts_text_of_html_documents(tmp_path):
    page = f"<html><body><script>alert('x')</script><style>.a{{}}</style><p>{GOOD}</p></body></html>"
    out, report = run_clean(tmp_path, [{"text": page, "format": "html"}, {"text": "<p>not html: " + GOOD + "</p>"}])
    assert out[0]["text"] == GOOD
    assert out[1]["text"].startswith("<p>not html")  # only documents marked as HTML are parsed
    assert report["transformed"]["html_docs"] == 1


# --------------------------------------------------------------------------- quality rules

DUP_LONG = "Our warranty covers manufacturing defects for two full years from the date of delivery."
RULE_CASES = {
    # rule: (document that triggers it, similar document that does not, config overrides)
    "too_short": ("Too short to keep.", GOOD, {}),
    "too_long": (" ".join([GOOD] * 4), GOOD, {"max_words": 40}),
    "mean_word_length": ("a b c d e f g h i j k l m n o p q r s t u v w x y z", GOOD, {}),
    "symbol_word_ratio": ("#sale #deal #shop today only, grab the #best #offers in our #store now",
                          "We ranked #1 in customer service for the third year in a row, thanks to you all.", {}),
    "too_few_alpha_words": ("Prices: 12.99 14.50 3.20 7.75 19.99 24.00 5.10 8.80 and 11.40 13.30 USD",
                            "Prices start at 12.99 for the small kettle and 19.99 for the large kettle model.", {}),
    "bullet_lines": ("- Home page link\n- Shop all products\n- Returns and refunds\n- Contact support team",
                     "Menu for today:\n- Home page link\n- Shop all products\nWe also write long paragraphs here.",
                     {}),
    "ellipsis_lines": ("Breaking news from the shop floor...\nYou will not believe what happened...\n"
                       "The new catalogue is finally here today.\nPrices are lower than ever before now.",
                       "Breaking news from the shop floor...\nThe new catalogue is finally here today.\n"
                       "Prices are lower than ever before now.\nDelivery is free this week for everyone.", {}),
    "dup_lines": ("Add to cart now\nAdd to cart now\nAdd to cart now\nFree shipping on all orders today",
                  "Add to cart now\nFree shipping on all orders today\nReturns accepted for thirty days\n"
                  "Add to cart now", {}),
    "dup_line_chars": (f"{DUP_LONG}\nShort line one here\nShort line two here\nAnother short line\n"
                       f"Yet one more line\nA sixth short line\nA seventh short line\nLine number eight\n{DUP_LONG}",
                       f"{DUP_LONG}\nShort line one here\nShort line two here\nAnother short line\n"
                       "Yet one more line\nA sixth short line\nA seventh short line\nLine number eight", {}),
}


def test_every_quality_rule_has_a_test_case():
    assert set(RULE_CASES) == {r.name for r in RULES}


@pytest.mark.parametrize("rule", list(RULE_CASES))
def test_quality_rule_triggers_and_spares(rule):
    bad, good, overrides = RULE_CASES[rule]
    cfg = CleanConfig(**overrides)
    failure = first_failure(bad, cfg)
    assert failure is not None and failure[0] == rule, failure
    assert first_failure(good, cfg) is None


@pytest.mark.parametrize(("text", "overrides", "reason"), [
    ("Extraordinarily comprehensive documentation everywhere.", {}, "4 words < min_words 8"),
    ("Incomprehensibilities counterrevolutionaries electroencephalographically "
     "antidisestablishmentarianism floccinaucinihilipilification hippopotomonstrosesquippedalian "
     "pneumonoultramicroscopic supercalifragilistic", {}, "mean word length 25.25 outside"),
    ("Read more... Click here... Find out... what happens next... in our shop...", {}, "ellipses per word"),
    ("a b c d e f g h i j k l m n o p q r s t u v w x y z", {"min_mean_word_len": 1.0}, None),
    ("Too short to keep.", {"min_chars": 0, "min_words": 0}, None),
])
def test_rule_variants_and_thresholds_come_from_config(text, overrides, reason):
    failure = first_failure(text, CleanConfig(**overrides))
    if reason is None:
        assert failure is None
    else:
        assert failure is not None and reason in failure[1]


def test_clean_reports_each_rule_with_examples(tmp_path):
    docs = [{"id": f"{rule}-bad", "text": bad} for rule, (bad, _, o) in RULE_CASES.items() if not o]
    docs += [{"id": f"{rule}-good", "text": good} for rule, (_, good, o) in RULE_CASES.items() if not o]
    out, report = run_clean(tmp_path, docs, near_dedup=False, exact_dedup=False)
    for rule, (_, _, overrides) in RULE_CASES.items():
        if overrides:
            continue
        entry = report["rules"][rule]
        assert entry["docs"] == 1, rule
        assert entry["chars"] == len(RULE_CASES[rule][0])
        [example] = entry["examples"]
        assert example["id"] == f"{rule}-bad" and example["source"] == "test"
        assert example["snippet"] == RULE_CASES[rule][0][:200]
        assert entry["fields"]
    assert sorted(d["id"] for d in out) == sorted(d["id"] for d in docs if d["id"].endswith("-good"))


# --------------------------------------------------------------------------- PII

PII_FOUND = [
    ("email", "Write to jane.doe+shop@example.co.uk today.", "Write to [EMAIL] today."),
    ("email", "Reply to support@mail.example.com.", "Reply to [EMAIL]."),
    ("phone", "Call +44 20 7946 0958 now.", "Call [PHONE] now."),
    ("phone", "Call +1 (415) 555-2671.", "Call [PHONE]."),
    ("phone", "US line (415) 555-2671 or 415.555.2671", "US line [PHONE] or [PHONE]"),
    ("phone", "Berlin +49 30 12345678, Paris +33 1 23 45 67 89", "Berlin [PHONE], Paris [PHONE]"),
    ("phone", "UK 020 7946 0958, FR 01 23 45 67 89, NL 06-12345678", "UK [PHONE], FR [PHONE], NL [PHONE]"),
    ("phone", "From abroad 0044 20 7946 0958", "From abroad [PHONE]"),
    ("ip", "Logged from 192.168.1.23.", "Logged from [IP]."),
    ("ip", "IPv6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 and 2001:db8::8a2e:370:7334", "IPv6 [IP] and [IP]"),
    ("ip", "Mapped ::ffff:192.0.2.128 here", "Mapped [IP] here"),
    ("card", "Card 4111 1111 1111 1111 on file", "Card [CARD] on file"),
    ("card", "Cards 4111-1111-1111-1111, 5555555555554444, 3782 822463 10005", "Cards [CARD], [CARD], [CARD]"),
]

NOT_PII = [
    "Order #123456789012 shipped on 2024-01-15 at 10:30.",
    "Order number 1234567812345670 passes Luhn but no card starts with 1.",
    "Dates 15/01/2024, 01.02.2024 and 05.06.2024 12 pieces.",
    "Prices $1,299.99 or 1.299,99 EUR; 7 items for 12.99.",
    "Version 1.2.3, v1.2.3.4 and OID 1.2.3.4.5; not an IP: 999.1.1.1.",
    "Time 10:30:15, MAC 00:1a:2b:3c:4d:5e, C++ std::vector and a::b.",
    "Image logo@2x.png and a mention @jane.",
    "ISBN 978-3-16-148410-0, zip 94105-1234, code 123-45-6789, years 1990-2000.",
    "A population of 1 000 000 and tracking 1Z999AA10123456784.",
    "Card-like 4111 1111 1111 1112 fails the Luhn check.",
    "Short numbers: order 555 1234, ext. 1234, 123456.",
]


@pytest.mark.parametrize(("kind", "text", "expected"), PII_FOUND)
def test_pii_is_scrubbed(kind, text, expected):
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == expected
    assert counts[kind] == expected.count(f"[{kind.upper()}]") and sum(counts.values()) == counts[kind]


@pytest.mark.parametrize("text", NOT_PII)
def test_pii_look_alikes_are_kept(text):
    assert scrub_pii(text) == (text, {"email": 0, "phone": 0, "ip": 0, "card": 0})


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_clean_counts_pii_and_keeps_it_out_of_report_examples(tmp_path):
    docs = [
        {"id": "a", "text": f"{GOOD} Mail jane@example.com or call +44 20 7946 0958 from 10.0.0.1."},
        {"id": "b", "text": f"{GOOD} Card 4111 1111 1111 1111, backup bob@example.org."},
        {"id": "short", "text": "Mail jane@example.com"},  # dropped as too short
    ]
    out, report = run_clean(tmp_path, docs)
    assert report["pii"] == {"email": 2, "phone": 1, "ip": 1, "card": 1}
    assert out[0]["text"].endswith("Mail [EMAIL] or call [PHONE] from [IP].")
    assert out[1]["text"].endswith("Card [CARD], backup [EMAIL].")
    assert report["rules"]["too_short"]["examples"][0]["snippet"] == "Mail [EMAIL]"
    assert "@" not in (tmp_path / "clean_report.json").read_text(encoding="utf-8")

    out, report = run_clean(tmp_path, docs, scrub_pii=False)
    assert "jane@example.com" in out[0]["text"] and report["pii"]["email"] == 0


# --------------------------------------------------------------------------- safety hook


def flag_refunds(text: str) -> str | None:
    return "mentions refunds" if "refund" in text else None


def test_safety_filter_callable_drops_with_reason(tmp_path):
    docs = [{"id": "ok", "text": GOOD}, {"id": "bad", "text": GOOD + " Ask for a refund."}]
    raw = write_raw(tmp_path / "raw.jsonl", docs)
    report = clean(raw, tmp_path / "c.jsonl", tmp_path / "r.json", CleanConfig(workers=1), safety_filter=flag_refunds)
    assert [json.loads(x)["id"] for x in (tmp_path / "c.jsonl").read_text().splitlines()] == ["ok"]
    safety = report["rules"]["safety"]
    assert safety["docs"] == 1 and safety["reasons"] == {"mentions refunds": 1}
    assert safety["examples"][0]["id"] == "bad" and safety["examples"][0]["reason"] == "mentions refunds"


def test_safety_filter_from_config_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_safety.py").write_text(
        "def check(text):\n    return 'shouting' if text.isupper() else None\nNOT_CALLABLE = 3\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    docs = [{"text": GOOD}, {"text": GOOD.upper()}]
    out, report = run_clean(tmp_path, docs, safety_filter="my_safety:check", workers=2)
    assert [d["text"] for d in out] == [GOOD]
    assert report["rules"]["safety"]["reasons"] == {"shouting": 1}


def test_safety_filter_errors_name_the_document(tmp_path):
    raw = write_raw(tmp_path / "raw.jsonl", [{"id": "doc-1", "text": GOOD}])

    def broken(text):
        raise RuntimeError("model not loaded")

    with pytest.raises(ChatforgeError, match=r"safety_filter raised on document 'doc-1': RuntimeError: model not loaded"):
        clean(raw, tmp_path / "c.jsonl", tmp_path / "r.json", CleanConfig(workers=1), safety_filter=broken)
    with pytest.raises(ChatforgeError, match=r"must return None or a reason string, got bool for document 'doc-1'"):
        clean(raw, tmp_path / "c.jsonl", tmp_path / "r.json", CleanConfig(workers=1), safety_filter=lambda t: True)
    assert not (tmp_path / "c.jsonl").exists()


@pytest.mark.parametrize(("spec", "message"), [
    ("no_such_module_xyz:check", r"clean\.safety_filter: cannot import module 'no_such_module_xyz'"),
    ("json:no_such_function", r"clean\.safety_filter: module 'json' has no attribute 'no_such_function'"),
    ("json", r"clean\.safety_filter: 'json' must look like 'package.module:function'"),
])
def test_safety_filter_bad_import_path(tmp_path, spec, message):
    raw = write_raw(tmp_path / "raw.jsonl", [{"text": GOOD}])
    with pytest.raises(ConfigError, match=message):
        clean(raw, tmp_path / "c.jsonl", tmp_path / "r.json", CleanConfig(safety_filter=spec))
    assert not (tmp_path / "c.jsonl").exists()
    with pytest.raises(ConfigError, match="clean.safety_filter"):
        load_safety_filter(spec)


# --------------------------------------------------------------------------- dedup


def test_exact_duplicates_ignore_whitespace_and_keep_the_first(tmp_path):
    docs = [{"id": "first", "text": GOOD}, {"id": "other", "text": prose(1, 40)},
            {"id": "copy", "text": GOOD.replace(" ", "  \n ", 3)}]
    out, report = run_clean(tmp_path, docs)
    assert [d["id"] for d in out] == ["first", "other"]
    entry = report["rules"]["exact_duplicate"]
    assert entry["docs"] == 1 and entry["examples"][0]["reason"] == "same text as 'first'"

    out, _ = run_clean(tmp_path, docs, exact_dedup=False, near_dedup=False)
    assert len(out) == 3


def test_near_duplicates_are_dropped_unrelated_kept(tmp_path):
    base = prose(7, 300).split()
    edited = list(base)
    for i in (50, 150, 250):  # three words changed, far apart
        edited[i] = "zeppelin"
    docs = [{"id": "orig", "text": " ".join(base)}, {"id": "edited", "text": " ".join(edited)},
            {"id": "unrelated", "text": prose(8, 300)}]
    out, report = run_clean(tmp_path, docs)
    assert [d["id"] for d in out] == ["orig", "unrelated"]
    [example] = report["rules"]["near_duplicate"]["examples"]
    assert example["id"] == "edited" and example["reason"].startswith("near-duplicate of 'orig' (Jaccard ~0.")

    out, _ = run_clean(tmp_path, docs, near_dedup=False)
    assert len(out) == 3
    # A stricter threshold than the pair's similarity keeps both.
    out, _ = run_clean(tmp_path, docs, minhash_threshold=0.97)
    assert len(out) == 3
    with pytest.raises(ConfigError, match=r"clean\.minhash_threshold: 0\.99 is too high for clean\.minhash_num_perm 128"):
        run_clean(tmp_path, docs, minhash_threshold=0.99)


# --------------------------------------------------------------------------- report, workers, failures


def mixed_corpus(n: int) -> list[dict]:
    """Good docs plus short ones, exact and near duplicates, HTML and PII, in a fixed pattern."""
    docs: list[dict] = []
    for i in range(n):
        kind = i % 7
        if kind == 0:
            doc = {"text": "Short."}
        elif kind == 1:
            doc = {"format": "html", "text": f"<p>{prose(i, 60)}</p><script>x()</script><p>Mail a{i}@example.com</p>"}
        elif kind == 3:  # an exact copy of the previous (prose) document
            doc = {"text": docs[i - 1]["text"]}
        elif kind == 5:  # the previous (prose) document with one word changed
            near = docs[i - 1]["text"].split()
            near[len(near) // 2] = "zeppelin"
            doc = {"text": " ".join(near)}
        else:
            doc = {"text": prose(i, 120 + i % 50)}
        docs.append({"id": f"d{i}", **doc})
    return docs


def test_report_counts_add_up(tmp_path):
    docs = mixed_corpus(120)
    out, report = run_clean(tmp_path, docs)
    dropped_docs = sum(e["docs"] for e in report["rules"].values())
    dropped_chars = sum(e["chars"] for e in report["rules"].values())
    assert report["input"]["docs"] == len(docs) == report["output"]["docs"] + dropped_docs
    assert report["output"]["docs"] == len(out)
    assert report["dropped"] == {"docs": dropped_docs, "chars": dropped_chars}
    assert report["input"]["chars"] == sum(len(d["text"]) for d in docs)
    assert report["output"]["chars"] == sum(len(d["text"]) for d in out)
    assert report["input"]["chars"] == (report["output"]["chars"] + dropped_chars
                                        + report["transformed"]["chars_removed"])
    for name in ("too_short", "exact_duplicate", "near_duplicate"):
        assert report["rules"][name]["docs"] > 0, name
        assert len(report["rules"][name]["examples"]) == min(3, report["rules"][name]["docs"])
    assert report["pii"]["email"] > 0
    assert report["wall_time_s"] > 0 and report["mb_per_s"] > 0 and report["workers"] == 1
    assert report["input"]["bytes"] == (tmp_path / "raw.jsonl").stat().st_size
    assert report["config"] == dataclasses.asdict(CleanConfig(workers=1))

    _, report = run_clean(tmp_path, docs, examples_per_rule=1)
    assert all(len(e["examples"]) <= 1 for e in report["rules"].values())


def test_output_is_identical_for_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(clean_module, "_CHUNK_LINES", 8)  # many chunks, so both workers get several
    raw = write_raw(tmp_path / "raw.jsonl", mixed_corpus(200))
    reports = {}
    for workers in (1, 2):
        reports[workers] = clean(raw, tmp_path / f"c{workers}.jsonl", tmp_path / f"r{workers}.json",
                                 CleanConfig(workers=workers))
    assert (tmp_path / "c1.jsonl").read_bytes() == (tmp_path / "c2.jsonl").read_bytes()
    volatile = ("wall_time_s", "mb_per_s", "workers", "config")
    strip = [{k: v for k, v in r.items() if k not in volatile} for r in reports.values()]
    assert strip[0] == strip[1]
    assert reports[2]["workers"] == 2


def test_failed_clean_leaves_existing_outputs_untouched(tmp_path):
    out, report = tmp_path / "clean.jsonl", tmp_path / "clean_report.json"
    out.write_text("earlier clean\n", encoding="utf-8")
    report.write_text("{}\n", encoding="utf-8")
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"id": "a", "text": GOOD}) + "\n" + '{"id": "b", "text": oops}\n', encoding="utf-8")
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"raw\.jsonl:2: malformed JSON"):
            clean(raw, out, report, CleanConfig(workers=workers))
        assert out.read_text(encoding="utf-8") == "earlier clean\n"
        assert report.read_text(encoding="utf-8") == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl", "clean_report.json", "raw.jsonl"]


def test_everything_dropped_is_an_error_naming_the_rules(tmp_path):
    out = tmp_path / "clean.jsonl"
    out.write_text("earlier\n", encoding="utf-8")
    raw = write_raw(tmp_path / "raw.jsonl", [{"text": "tiny"}, {"text": "also tiny"}])
    with pytest.raises(DataError, match=r"every one of 2 documents was dropped \(too_short: 2\)"):
        clean(raw, out, tmp_path / "r.json", CleanConfig(workers=1))
    assert out.read_text(encoding="utf-8") == "earlier\n"


@pytest.mark.parametrize(("line", "message"), [
    ('{"id": "x", "body": "no text"}', r"raw\.jsonl:1: missing field 'text'; fields present: id, body"),
    ('{"id": "x", "text": 42}', r"raw\.jsonl:1: field 'text' must be a string, got int"),
    ('["not", "an", "object"]', r"raw\.jsonl:1: expected a JSON object, got list"),
])
def test_bad_raw_records_are_located(tmp_path, line, message):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        clean(raw, tmp_path / "c.jsonl", tmp_path / "r.json", CleanConfig(workers=1))


def test_broken_unicode_in_ids_and_text_is_repaired(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"id": "bad\ud800id", "text": GOOD + " \udc00\x00"}) + "\n", encoding="utf-8")
    report = clean(raw, tmp_path / "c.jsonl", tmp_path / "r.json", CleanConfig(workers=1))
    [doc] = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()]
    assert doc["id"] == "bad\ufffdid" and doc["text"] == GOOD + " "
    assert report["output"]["docs"] == 1


def test_missing_or_empty_input(tmp_path):
    with pytest.raises(DataError, match=r"raw\.jsonl: cannot read file"):
        clean(tmp_path / "raw.jsonl", tmp_path / "c.jsonl", tmp_path / "r.json", CleanConfig(workers=1))
    (tmp_path / "raw.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"raw\.jsonl: no documents to clean"):
        clean(tmp_path / "raw.jsonl", tmp_path / "c.jsonl", tmp_path / "r.json", CleanConfig(workers=1))


# --------------------------------------------------------------------------- safety policy (data actions)

POLICY_TOML = r"""
name = "test-policy"

[categories.T1]
name = "weapons"
data = "drop"
patterns = ['\bbuild a (pipe )?bomb\b']

[categories.T2]
name = "rude"
data = "flag"
words = ["nitwit", "dimwit"]

[categories.T3]
name = "kitchen"
data = "keep"
patterns = ['\bkettle\b']

[categories.T4]
name = "cards"
data = "flag"
pii = ["card"]
"""


def write_policy(tmp_path: Path, text: str = POLICY_TOML) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_safety_policy_drops_flags_and_keeps_per_category(tmp_path):
    docs = [
        {"id": "fine", "text": GOOD},
        {"id": "bomb", "text": f"{GOOD} Here is how to build a pipe bomb at home."},
        {"id": "rude", "text": f"{GOOD} Only a nitwit would wait that long."},
        {"id": "rude-copy", "text": f"{GOOD} Only a nitwit would wait that long."},  # exact duplicate: not in output
        {"id": "kettle", "text": f"{GOOD} The kettle boils in two minutes."},  # a "keep" category: nothing happens
        {"id": "card", "text": f"{GOOD} My card 4111 1111 1111 1111 was charged twice."},
    ]
    policy = write_policy(tmp_path)
    out, report = run_clean(tmp_path, docs, safety_policy=policy, scrub_pii=False)
    assert [d["id"] for d in out] == ["fine", "rude", "kettle", "card"]

    safety = report["safety"]
    assert safety["policy"] == "test-policy" and safety["source"] == policy
    assert set(safety["categories"]) == {"weapons", "rude", "cards"}  # "keep" categories are not checked
    assert (safety["dropped"], safety["flagged"]) == (1, 2)
    weapons, rude, cards = (safety["categories"][c] for c in ("weapons", "rude", "cards"))
    assert (weapons["action"], weapons["dropped"], weapons["flagged"]) == ("drop", 1, 0)
    assert weapons["examples"] == [{"id": "bomb", "source": "test", "rule": "pattern", "evidence": "build a pipe bomb",
                                    "snippet": weapons["examples"][0]["snippet"]}]
    assert "build a pipe bomb at home." in weapons["examples"][0]["snippet"]
    # The flagged duplicate was dropped by dedup, so only the kept copy counts.
    assert (rude["action"], rude["dropped"], rude["flagged"]) == ("flag", 0, 1)
    assert [(e["id"], e["rule"], e["evidence"]) for e in rude["examples"]] == [("rude", "blocklist", "nitwit")]
    # A PII match is reported as its kind, never as the number itself.
    assert [(e["id"], e["rule"], e["evidence"]) for e in cards["examples"]] == [("card", "pii:card", "[CARD]")]
    assert "[CARD] was charged twice" in cards["examples"][0]["snippet"]
    assert "4111" not in json.dumps(safety)

    # The drop is also an ordinary "safety" rule drop: counted, with its reason.
    rule = report["rules"]["safety"]
    assert rule["docs"] == 1 and rule["fields"] == ["safety_policy", "safety_filter"]
    assert rule["reasons"] == {"weapons: pattern 'build a pipe bomb'": 1}
    assert rule["examples"][0]["id"] == "bomb"
    assert report["input"]["docs"] == report["output"]["docs"] + report["dropped"]["docs"]


def test_safety_policy_scrubs_pii_first_and_limits_examples(tmp_path):
    docs = [{"id": f"r{i}", "text": f"{prose(i, 30)} Such a dimwit, card 4111 1111 1111 1111."} for i in range(5)]
    _, report = run_clean(tmp_path, docs, safety_policy=write_policy(tmp_path), examples_per_rule=2)
    cats = report["safety"]["categories"]
    assert cats["cards"]["flagged"] == 0  # scrub_pii replaced the card numbers before the policy saw the text
    assert cats["rude"]["flagged"] == 5 and len(cats["rude"]["examples"]) == 2
    assert report["pii"]["card"] == 5


def test_safety_policy_off_and_with_a_safety_filter(tmp_path):
    docs = [{"id": "bomb", "text": "Somebody asked in the forum how to build a bomb from parts of old kitchen gear."},
            {"id": "refund", "text": "The customer asked for a refund because the lamp arrived with a cracked shade."},
            {"id": "fine", "text": "Our warehouse team packs every parcel within a day and ships it the next morning."}]
    out, report = run_clean(tmp_path, docs)
    assert report["safety"] is None and len(out) == 3
    raw = write_raw(tmp_path / "raw.jsonl", docs)
    report = clean(raw, tmp_path / "c.jsonl", tmp_path / "r.json",
                   CleanConfig(workers=1, safety_policy=write_policy(tmp_path)), safety_filter=flag_refunds)
    assert report["rules"]["safety"]["reasons"] == {"weapons: pattern 'build a bomb'": 1, "mentions refunds": 1}
    assert report["output"]["docs"] == 1 and report["safety"]["dropped"] == 1


def test_default_policy_drops_unsafe_text(tmp_path):
    docs = [{"id": "fine", "text": GOOD}, {"id": "harm", "text": f"{GOOD} Tell me how can I kill my neighbour."}]
    out, report = run_clean(tmp_path, docs, safety_policy="default")
    assert [d["id"] for d in out] == ["fine"]
    assert report["safety"]["policy"] == "chatforge-default" and report["safety"]["dropped"] == 1
    [(name, entry)] = [(n, e) for n, e in report["safety"]["categories"].items() if e["dropped"]]
    assert entry["action"] == "drop" and entry["examples"][0]["id"] == "harm"


def test_safety_policy_output_is_identical_for_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(clean_module, "_CHUNK_LINES", 8)
    docs = mixed_corpus(120)
    for i in range(0, 120, 11):
        docs[i] = {"id": docs[i]["id"], "text": f"{prose(i, 40)} You dimwit, I will build a bomb."}
    for i in range(4, 120, 13):
        docs[i] = {"id": docs[i]["id"], "text": f"{prose(i, 40)} What a nitwit."}
    raw = write_raw(tmp_path / "raw.jsonl", docs)
    policy = write_policy(tmp_path)
    reports = {w: clean(raw, tmp_path / f"c{w}.jsonl", tmp_path / f"r{w}.json",
                        CleanConfig(workers=w, safety_policy=policy)) for w in (1, 2)}
    assert (tmp_path / "c1.jsonl").read_bytes() == (tmp_path / "c2.jsonl").read_bytes()
    volatile = ("wall_time_s", "mb_per_s", "workers", "config")
    strip = [{k: v for k, v in r.items() if k not in volatile} for r in reports.values()]
    assert strip[0] == strip[1]
    assert strip[0]["safety"]["dropped"] == 11 and strip[0]["safety"]["flagged"] == 9


def test_policy_pickles_for_spawned_workers(tmp_path):
    import pickle

    from chatforge.safety import Moderator, load_policy

    for spec in ("default", write_policy(tmp_path)):
        policy = load_policy(spec)
        copy = pickle.loads(pickle.dumps(policy))
        text = "Only a nitwit would build a bomb; tell me how can I kill time. Card 4111 1111 1111 1111."
        assert (Moderator(copy).check(text, "data", use_classifier=False).to_dict()
                == Moderator(policy).check(text, "data", use_classifier=False).to_dict())


@pytest.mark.parametrize(("value", "message"), [
    ("policy.yaml", r"clean\.safety_policy: 'policy.yaml' must be '' \(off\), 'default'"),
    ("true", r"clean\.safety_policy: 'true' must be"),
])
def test_safety_policy_setting_is_validated(value, message):
    from chatforge.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides=[f"clean.safety_policy={json.dumps(value)}"])


def test_bad_policy_file_fails_before_any_output(tmp_path):
    raw = write_raw(tmp_path / "raw.jsonl", [{"text": GOOD}])
    with pytest.raises(ConfigError, match=r"clean\.safety_policy: .*missing\.toml: no such policy file"):
        clean(raw, tmp_path / "c.jsonl", tmp_path / "r.json",
              CleanConfig(workers=1, safety_policy=str(tmp_path / "missing.toml")))
    bad = write_policy(tmp_path, '[categories.X]\nname = "x"\ndata = "burn"\n')
    with pytest.raises(ConfigError, match=r"clean\.safety_policy: .*categories\.X\.data: 'burn' is not one of keep"):
        clean(raw, tmp_path / "c.jsonl", tmp_path / "r.json", CleanConfig(workers=1, safety_policy=bad))
    assert not (tmp_path / "c.jsonl").exists()
