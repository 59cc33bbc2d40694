"""PII redaction: emails, IP addresses, keys and secrets, passwords, private key blocks.

Emails and IPs follow bigcode's regexes and false-positive filters
(`pii/utils/emails_ip_addresses_detection.py`). Keys use the `detect-secrets` plugins bigcode's
`keys_detection.py` enables, but scanned in memory: each plugin's own regex (or, for the
high-entropy plugins, a quoted run long enough to reach the entropy limit) finds the few lines
worth analysing, and only those go through the plugin. bigcode wrote every file to a temporary
file for `scan_file`, about 6x the cost of MinHash. Two things bigcode turned off are on here:
passwords in config assignments, and whole `BEGIN ... PRIVATE KEY ... END` blocks (not only the
line detect-secrets flags).
"""

from __future__ import annotations

import ipaddress
import math
import random
import re
import string
from dataclasses import dataclass
from typing import Optional

import regex

from starcoder.curation.config import PIIConfig

EMAIL = regex.compile(r"""
    (?<= ^ | [\b\s@,?!;:)('".\p{Han}<] )
    ( [^\b\s@?!;,:)('"<]+ @ [^\b\s@!?;,/]* [^\b\s@?!;,/:)('">.] \. \p{L} \w{1,} )
    (?= $ | [\b\s@,?!;:)('".\p{Han}>] )
""", flags=regex.MULTILINE | regex.VERSION1 | regex.VERBOSE)

# Cheap candidates; `ipaddress` decides what is an address.
IP = re.compile(r"(?<![\w.:])(?:(?P<v4>\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})|"
                r"(?P<v6>[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}))(?![\w.:])")
NOT_AN_ADDRESS = re.compile(r"(?i)(section|version|release|spec)s?\b")  # earlier on the line
DATE_LIKE = re.compile(r"^\d{1,4}[./-]\d{1,2}[./-]\d{1,4}$")
# Popular public DNS resolvers bigcode keeps (they identify nobody).
DNS_IPS = {"8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "76.76.19.19", "76.223.122.150",
           "9.9.9.9", "149.112.112.112", "208.67.222.222", "208.67.220.220", "8.26.56.26",
           "8.20.247.20", "94.140.14.14", "94.140.15.15"}

# RFC 2606 documentation domains identify nobody.
EXAMPLE_DOMAIN = re.compile(r"(?i)@(?:[\w-]+\.)*(?:example\.(?:com|net|org)|[\w-]+\.(?:example|invalid|test|localhost))$")
PASSWORD = re.compile(
    r"""(?i)(?<![\w])(?:password|passwd|pass|pwd|db_pass(?:word)?)["']?\s*(?::|=|=>)\s*["']([^"'\s]{4,128})["']""")
PLACEHOLDER = re.compile(r"(?i)^(?:[*x.]+|<.*>|\$\{.*\}|\{.*\}|%\(?\w*\)?s|changeme|password|secret|"
                         r"your[_-]?password.*|none|null|true|false|example|test|dummy)$")
PRIVATE_KEY = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY((?: BLOCK)?)-----.*?"
                         r"-----END \1PRIVATE KEY\2-----", re.S)
JWT_TAIL = re.compile(r"[A-Za-z0-9_=+/.-]*")
HASH_WORDS = re.compile(r"(?i)sha|md5|hash|digest|checksum|crc|uuid|fingerprint|nonce")
# A literal a plugin's pattern cannot match without (on the same line): only lines holding it
# go through that plugin's slow keyword-assignment regexes.
PLUGIN_HINTS = {
    "ArtifactoryDetector": r"AKC|AP[\dABCDEF]",
    "CloudantDetector": r"(?i)key|pw|pass|token|cloudant",
    "IbmCloudIamDetector": r"(?i)key|pw|pass|token",
    "IbmCosHmacDetector": r"(?i)secret",
    "SoftlayerDetector": r"(?i)key|pw|pass|token|softlayer",
    "MailchimpDetector": r"-us\d",
    "SlackDetector": r"xox|hooks\.slack",
}
# bigcode's plugin list (keys_detection.py), without the network-only and keyword plugins.
KEY_PLUGINS = ("ArtifactoryDetector", "AWSKeyDetector", "AzureStorageKeyDetector",
               "CloudantDetector", "DiscordBotTokenDetector", "GitHubTokenDetector",
               "IbmCloudIamDetector", "IbmCosHmacDetector", "JwtTokenDetector", "MailchimpDetector",
               "NpmDetector", "SendGridDetector", "SlackDetector", "SoftlayerDetector",
               "StripeDetector", "TwilioKeyDetector")
TOKENS = {"email": "<EMAIL>", "key": "<KEY>", "password": "<PASSWORD>", "private_key": "<KEY>"}
SYNTHETIC_IPS = {4: ["172.16.31.10", "172.16.58.3", "172.16.17.32", "192.168.127.12", "192.168.3.11"],
                 6: ["fdf8:f53e:61e4::18", "fc00:e968:6179::de52:7100", "fd00:a516:7c1b:17cd:6d81:2137:bd2a:2c5b",
                     "fc00:db20:35b:7399::5", "fdfb:fc0b:2a5c:1b10::1"]}


@dataclass
class Finding:
    kind: str  # email | ip | key | password | private_key
    start: int
    end: int
    value: str
    detail: str = ""  # the detect-secrets type for keys


def _plugins():
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    by_name = {cls.__name__: cls for cls in get_mapping_from_secret_type_to_class().values()}
    regex_plugins = [by_name[name]() for name in KEY_PLUGINS if name in by_name]
    entropy = [by_name["Base64HighEntropyString"](), by_name["HexHighEntropyString"]()]
    return regex_plugins, entropy


class PIIScanner:
    def __init__(self, cfg: PIIConfig):
        self.cfg = cfg
        self.regex_plugins, self.entropy_plugins = _plugins() if cfg.keys else ([], [])
        # One prefilter per plugin: its own patterns; a line without a hit cannot yield a secret.
        self.prefilters = [
            (p, re.compile(PLUGIN_HINTS.get(type(p).__name__) or
                           "|".join(f"(?:{r.pattern})" for r in p.denylist), p.denylist[0].flags))
            for p in self.regex_plugins]
        # A string of n distinct symbols has at most log2(n) bits of entropy: shorter quoted runs
        # cannot pass the plugin's limit.
        self.entropy_prefilters = [
            (p, re.compile(r"(['\"])([%s]{%d,})\1" % (re.escape(p.charset), 2 ** math.floor(p.entropy_limit) + 1)))
            for p in self.entropy_plugins]

    def scan(self, text: str) -> list[Finding]:
        cfg, found = self.cfg, []
        if cfg.private_keys and "PRIVATE KEY" in text:
            found += [Finding("private_key", m.start(), m.end(), m.group()) for m in PRIVATE_KEY.finditer(text)]
        if cfg.emails and "@" in text:
            found += [Finding("email", m.start(1), m.end(1), m.group(1)) for m in EMAIL.finditer(text)
                      if _plausible_email(m.group(1))]
        if cfg.ips:
            found += [f for f in (self._ip(text, m) for m in IP.finditer(text)) if f]
        if cfg.passwords:
            found += [Finding("password", m.start(1), m.end(1), m.group(1)) for m in PASSWORD.finditer(text)
                      if not PLACEHOLDER.match(m.group(1))]
        if cfg.keys:
            found += self._keys(text)
        return _without_overlaps(found)

    def _ip(self, text: str, m: re.Match) -> Optional[Finding]:
        value = m.group()
        if DATE_LIKE.match(value) or NOT_AN_ADDRESS.search(text, text.rfind("\n", 0, m.start()) + 1, m.start()):
            return None
        if m.group("v6") and (value.count(":") - value.count("::") < 3 or not value.strip(":0fF")):
            return None  # slices like x[1::2], and masks
        if m.group("v4") and len(value) == 7:  # x.x.x.x looks like a version unless about DNS
            window = text[max(0, m.start() - 50):m.end() + 50].lower()
            if "dns" not in window and "server" not in window:
                return None
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            return None
        if (not any(c.isdigit() for c in value) or not ip.is_global or ip.is_multicast
                or ip.is_reserved or value in DNS_IPS):
            return None
        return Finding("ip", m.start(), m.end(), value, f"v{ip.version}")

    def _keys(self, text: str) -> list[Finding]:
        from detect_secrets.filters import heuristic
        found, lines = [], None
        candidates: list[tuple[object, int, bool]] = []  # (plugin, line start, is entropy)
        for plugin, pattern in self.prefilters:
            candidates += [(plugin, text.rfind("\n", 0, m.start()) + 1, False) for m in pattern.finditer(text)]
        for plugin, pattern in self.entropy_prefilters:
            candidates += [(plugin, text.rfind("\n", 0, m.start()) + 1, True) for m in pattern.finditer(text)]
        seen = set()
        for plugin, line_start, entropy in candidates:
            if (id(plugin), line_start) in seen:
                continue
            seen.add((id(plugin), line_start))
            line_end = text.find("\n", line_start)
            line = text[line_start:line_end if line_end >= 0 else None]
            for start, secret in self._secrets(plugin, line, entropy):
                if entropy and (plugin.calculate_shannon_entropy(secret) <= plugin.entropy_limit
                                or _looks_like_hash(secret, line)):
                    continue
                if (heuristic.is_sequential_string(secret) or _is_alphabet(secret)
                        or heuristic.is_potential_uuid(secret)
                        or heuristic.is_templated_secret(secret)
                        or heuristic.is_likely_id_string(secret, line, plugin)):
                    continue
                start += line_start
                end = start + len(secret)
                if plugin.secret_type == "JSON Web Token":  # its lazy regex stops before the signature
                    end += len(JWT_TAIL.match(text, end).group())
                found.append(Finding("key", start, end, text[start:end], plugin.secret_type))
        return found


    @staticmethod
    def _secrets(plugin, line: str, entropy: bool):
        """(offset, secret) pairs. detect-secrets reports a pattern's first group; where that group
        is only a prefix (GitHub's `ghp`), the whole match is the secret."""
        if entropy:
            for m in plugin.regex.finditer(line):
                yield m.start(2), m.group(2)
            return
        for pattern in plugin.denylist:
            for m in pattern.finditer(line):
                group = 1 if pattern.groups and len(m.group(1) or "") >= 8 else 0
                if getattr(plugin, "is_formally_valid", None) and not plugin.is_formally_valid(m.group()):
                    continue  # the JWT plugin's own check
                yield m.start(group), m.group(group)


def _plausible_email(value: str) -> bool:
    """Not a documentation domain, a letters-only top-level domain (not `ks_in@devanagari.utf8`),
    and not a placeholder like one@one.org."""
    local, _, domain = value.rpartition("@")
    tld = domain.rsplit(".", 1)[-1]
    return (not EXAMPLE_DOMAIN.search(value) and tld.isalpha()
            and local.lower() != domain.split(".")[0].lower())


def _looks_like_hash(secret: str, line: str) -> bool:
    """bigcode's heuristic: hex digests (32/40/64/128 chars) beside hash words are not keys."""
    is_hex = all(c in string.hexdigits for c in secret)
    return is_hex and len(secret) in (32, 40, 56, 64, 96, 128) and bool(HASH_WORDS.search(line))


def _is_alphabet(secret: str) -> bool:
    """Character tables ('ABC...XYZ234567'): mostly runs of consecutive code points."""
    steps = sum(ord(b) - ord(a) == 1 for a, b in zip(secret, secret[1:]))
    return steps >= 0.6 * (len(secret) - 1)


def _without_overlaps(found: list[Finding]) -> list[Finding]:
    """Longest first wins a region (a private key block swallows the keys inside it); at equal
    length a named detector beats the entropy check."""
    kept: list[Finding] = []
    for f in sorted(found, key=lambda f: (-(f.end - f.start), "Entropy" in f.detail, f.start)):
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


class Redactor:
    def __init__(self, cfg: PIIConfig):
        self.cfg, self.scanner = cfg, PIIScanner(cfg)

    def redact(self, text: str, doc_key: str = "") -> tuple[str, list[Finding]]:
        findings = self.scanner.scan(text)
        if not findings:
            return text, findings
        rng = random.Random(f"{self.cfg.seed}:{doc_key}")
        memo: dict[str, str] = {}  # the same value always gets the same replacement
        out, pos = [], 0
        for f in findings:
            out.append(text[pos:f.start])
            if f.value not in memo:
                memo[f.value] = self._replacement(f, rng)
            out.append(memo[f.value])
            pos = f.end
        out.append(text[pos:])
        return "".join(out), findings

    def _replacement(self, f: Finding, rng: random.Random) -> str:
        if f.kind == "ip":  # StarCoder also gave IPs a synthetic address, never a token
            return rng.choice(SYNTHETIC_IPS[int(f.detail[1])])
        if self.cfg.replacement == "tokens":
            return TOKENS[f.kind]
        if f.kind == "email":
            return "".join(rng.choices(string.ascii_lowercase, k=8)) + "@example.com"
        if f.kind == "private_key":
            head, _, rest = f.value.partition("\n")
            body, _, tail = rest.rpartition("\n")
            alphabet = string.ascii_letters + string.digits + "+/"
            fake = "\n".join("".join(rng.choices(alphabet, k=len(line))) for line in body.split("\n"))
            return f"{head}\n{fake}\n{tail}"
        return "".join(rng.choice(_same_class(c)) for c in f.value)


def _same_class(c: str) -> str:
    if c.isdigit():
        return string.digits
    if c.isupper():
        return string.ascii_uppercase
    if c.islower():
        return string.ascii_lowercase
    return c
