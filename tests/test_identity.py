"""Keyed identity mapping: determinism, key separation, formats, key loading and secrecy."""

from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import os
import pickle
import re
import struct

import pytest
from pydicom.valuerep import PersonName

from transforms import identity
from transforms.errors import RequestError
from transforms.identity import ENV_VAR, InvalidKey, Key

SECRET = b"0123456789abcdef0123456789abcdef"
OTHER = b"fedcba9876543210fedcba9876543210"
STUDY_UID = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"

# PS3.5 9.1: components of digits, no leading zero unless the component is "0", <= 64 chars.
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@pytest.fixture
def key() -> Key:
    return Key.from_bytes(SECRET)


def test_uid_is_the_documented_hmac(key):
    ns, value = b"study", STUDY_UID.encode()
    message = struct.pack(">I", len(ns)) + ns + struct.pack(">I", len(value)) + value
    mac = hmac.new(SECRET, message, hashlib.sha256).digest()
    assert key.uid("study", STUDY_UID) == "2.25." + str(int.from_bytes(mac[:16], "big"))
    assert key.digest("study", STUDY_UID) == mac


def test_uid_pinned_value(key):
    # Pins the format: a change here changes every output of every past run. The literal was
    # computed outside Python, from the documented construction:
    #   printf '\0\0\0\010instance\0\0\0\0051.2.3' \
    #     | openssl dgst -sha256 -hmac 0123456789abcdef0123456789abcdef
    # -> the first 32 hex digits, as a decimal after "2.25.".
    pinned = "2.25.198594657265378509301882514021072763707"
    assert key.uid("instance", "1.2.3") == pinned
    assert key.uid("instance", "1.2.3") == pinned  # answered from the key's cache
    assert Key.from_bytes(SECRET).uid("instance", "1.2.3") == pinned  # a fresh key, no cache
    assert "2.25." + str(
        int.from_bytes(hmac.new(SECRET, b"\0\0\0\x08instance\0\0\0\x051.2.3", hashlib.sha256).digest()[:16], "big")
    ) == pinned


def test_same_key_same_results_across_instances():
    a, b = Key.from_bytes(SECRET), Key.from_bytes(SECRET)
    assert a.uid(identity.SERIES, STUDY_UID) == b.uid(identity.SERIES, STUDY_UID)
    assert a.patient_id("PAT-001") == b.patient_id("PAT-001")
    assert a.patient_name("DOE^JOHN") == b.patient_name("DOE^JOHN")
    assert a.token("accession", "A123") == b.token("accession", "A123")
    assert a.key_id == b.key_id
    assert a == b and hash(a) == hash(b)


def test_different_keys_give_unrelated_results():
    a, b = Key.from_bytes(SECRET), Key.from_bytes(OTHER)
    assert a.uid("study", STUDY_UID) != b.uid("study", STUDY_UID)
    assert a.patient_id("PAT-001") != b.patient_id("PAT-001")
    assert a.patient_name("DOE^JOHN") != b.patient_name("DOE^JOHN")
    assert a.token("x", "y") != b.token("x", "y")
    assert a.key_id != b.key_id
    assert a != b


def test_different_namespaces_and_values_differ(key):
    uids = {key.uid(ns, STUDY_UID) for ns in (identity.STUDY, identity.SERIES, identity.INSTANCE, "other")}
    assert len(uids) == 4
    assert key.uid("study", "1.2.3") != key.uid("study", "1.2.4")
    # PatientID and PatientName use distinct namespaces even for the same text.
    assert key.patient_id("X")[5:] != key.patient_name("X")[5:]


def test_encoding_is_unambiguous(key):
    # A naive "namespace|value" or concatenation would make these equal.
    assert key.uid("ab", "c") != key.uid("a", "bc")
    assert key.uid("a\0\0\0\x01", "b") != key.uid("a", "\0\0\0\x01b")
    assert key.token("a|b", "c") != key.token("a", "b|c")


def test_surrounding_padding_is_ignored(key):
    expected = key.uid("instance", "1.2.3")
    assert key.uid("instance", "1.2.3\0") == expected
    assert key.uid("instance", " 1.2.3 ") == expected
    assert key.uid("instance", b"1.2.3\x00") == expected
    assert key.patient_id("PAT1 ") == key.patient_id("PAT1")
    assert key.patient_id(b"PAT1 ") == key.patient_id("PAT1")
    # Inner characters count.
    assert key.uid("instance", "1.2. 3") != expected


def test_non_ascii_str_and_utf8_bytes_agree(key):
    assert key.patient_name("Müller^Hans") == key.patient_name("Müller^Hans".encode("utf-8"))


@pytest.mark.parametrize("value", ["1.2.3", "", "0", STUDY_UID, "9" * 64, "x" * 1000])
def test_uid_shape(key, value):
    for ns in (identity.STUDY, identity.SERIES, identity.INSTANCE):
        uid = key.uid(ns, value)
        assert uid.startswith("2.25.")
        assert UID_RE.match(uid), uid
        assert len(uid) <= 44
        assert int(uid[5:]) < 2**128


def test_uid_is_valid_for_pydicom(key):
    from pydicom.uid import UID

    uid = UID(key.uid("study", STUDY_UID))
    assert uid.is_valid


def test_many_uids_unique_and_valid(key):
    uids = [key.uid("instance", f"1.2.826.0.1.3680043.2.1125.{i}") for i in range(5000)]
    assert len(set(uids)) == 5000
    assert all(UID_RE.match(u) and len(u) <= 64 for u in uids)


def test_patient_id_format(key):
    pid = key.patient_id("PAT-001")
    assert re.fullmatch(r"ANON-[A-Z2-7]{16}", pid), pid
    assert len(pid) == 21  # LO allows 64


def test_patient_name_is_valid_pn(key):
    name = key.patient_name("DOE^JOHN^^^")
    assert re.fullmatch(r"ANON\^[A-Z2-7]{16}", name), name
    pn = PersonName(name)
    assert pn.family_name == "ANON"
    assert pn.given_name == name[5:]


def test_token_format_and_length(key):
    assert re.fullmatch(r"[0-9a-f]{16}", key.token("accession", "A1"))
    assert re.fullmatch(r"[0-9a-f]{40}", key.token("accession", "A1", length=40))
    assert key.token("accession", "A1", length=40).startswith(key.token("accession", "A1"))
    with pytest.raises(ValueError, match="8..64"):
        key.token("accession", "A1", length=4)


def test_rejects_non_string_values(key):
    with pytest.raises(TypeError, match="str or bytes"):
        key.uid("study", 123)  # type: ignore[arg-type]


def test_cache_does_not_change_results(key):
    first = key.uid("instance", "1.2.3")
    key._cache.clear()
    assert key.uid("instance", "1.2.3") == first
    key._cache[("uid", "instance", b"1.2.3")] = "poisoned"
    assert key.uid("instance", "1.2.3") == "poisoned"  # proves the cache is consulted ...
    key._cache.clear()
    assert key.uid("instance", "1.2.3") == first  # ... and is only a cache


def test_key_id_is_derived_not_the_key(key):
    assert re.fullmatch(r"[0-9a-f]{12}", key.key_id)
    assert key.key_id == hmac.new(SECRET, b"dicom-deid key id v1", hashlib.sha256).hexdigest()[:12]
    assert key.key_id not in SECRET.hex() and key.key_id.encode() not in SECRET


def test_repr_and_str_do_not_show_the_key(key, caplog):
    text = repr(key) + str(key) + f"{key}" + "%s" % (key,)
    assert text.count(key.key_id) == 4
    for leak in (SECRET.decode(), SECRET.hex(), SECRET.decode()[:16]):
        assert leak not in text
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("using %s %r", key, key)
    assert SECRET.decode()[:16] not in caplog.text
    assert key.key_id in caplog.text


def test_pickle_and_deepcopy_round_trip(key):
    key.uid("study", STUDY_UID)  # populate the cache
    for clone in (pickle.loads(pickle.dumps(key)), copy.deepcopy(key)):
        assert clone == key
        assert clone.key_id == key.key_id
        assert clone.reproducible is True
        assert clone.uid("study", STUDY_UID) == key.uid("study", STUDY_UID)
        assert SECRET.decode() not in repr(clone)
    # The cache does not travel (it could be large).
    assert STUDY_UID.encode() not in pickle.dumps(key)


def test_random_key_is_not_reproducible():
    a, b = Key.random(), Key.random()
    assert a.reproducible is False and b.reproducible is False
    assert a != b
    assert a.uid("study", STUDY_UID) != b.uid("study", STUDY_UID)
    assert pickle.loads(pickle.dumps(a)).reproducible is False
    assert a.source == "random"


def test_from_file_strips_one_trailing_newline(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(SECRET + b"\n")
    assert Key.from_file(path) == Key.from_bytes(SECRET)
    path.write_bytes(SECRET + b"\r\n")
    assert Key.from_file(str(path)) == Key.from_bytes(SECRET)
    path.write_bytes(SECRET)
    key = Key.from_file(path)
    assert key == Key.from_bytes(SECRET)
    assert key.reproducible is True
    assert str(path) in key.source


def test_from_file_binary_key(tmp_path):
    raw = bytes(range(256))
    (tmp_path / "k").write_bytes(raw)
    assert Key.from_file(tmp_path / "k") == Key.from_bytes(raw)


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\n", "empty"), (b"short-key\n", "9 bytes")])
def test_from_file_refuses_empty_or_short(tmp_path, content, message):
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(InvalidKey, match=message) as info:
        Key.from_file(path)
    assert "short-key" not in str(info.value)
    assert isinstance(info.value, RequestError)
    assert info.value.reason == "refused_by_request"


def test_from_file_missing(tmp_path):
    with pytest.raises(InvalidKey, match="cannot read"):
        Key.from_file(tmp_path / "absent")


def test_short_key_error_does_not_show_the_key():
    with pytest.raises(InvalidKey, match=re.escape("15 bytes, at least 16 are required")) as info:
        Key.from_bytes(b"secretsecret123")
    assert "secretsecret123" not in str(info.value)


def test_from_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, SECRET.decode())
    assert Key.from_env() == Key.from_bytes(SECRET)
    assert Key.from_env().source == ENV_VAR
    assert Key.from_env({ENV_VAR: OTHER.decode()}) == Key.from_bytes(OTHER)


def test_from_env_takes_the_raw_bytes_of_a_binary_value(tmp_path):
    """``export DICOM_DEID_KEY="$(head -c 32 /dev/urandom)"``: Python holds the bytes that are
    not UTF-8 as lone surrogates, which used to end the command with an internal error. The key
    is the bytes the process was given, the same as --key-file on a file holding them."""
    import subprocess
    import sys

    raw = bytes(range(0x80, 0xA0)) + b"plain text"
    assert Key.from_env({ENV_VAR: os.fsdecode(raw)}) == Key.from_bytes(raw)
    (tmp_path / "k.key").write_bytes(raw)
    code = ("import os, sys; from transforms.identity import Key; "
            "sys.stdout.write(Key.from_env().key_id + ' ' + Key.load(os.environ['KEY_FILE']).key_id)")
    env = {**os.environb, ENV_VAR.encode(): raw, b"KEY_FILE": os.fsencode(tmp_path / "k.key")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)
    from_env, from_file = done.stdout.decode().split()
    assert from_env == from_file == Key.from_bytes(raw).key_id


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_a_key_file_and_its_content_in_the_variable_are_the_same_key(tmp_path, ending):
    """A Kubernetes secret made with ``--from-file`` keeps the file's newline in the variable:
    one trailing newline is ignored in both places, as it always was in the file. A second one
    is part of the key in both."""
    (tmp_path / "k.key").write_bytes(SECRET + ending)
    assert Key.from_env({ENV_VAR: (SECRET + ending).decode()}) == Key.from_file(tmp_path / "k.key") \
        == Key.from_bytes(SECRET)
    (tmp_path / "k2.key").write_bytes(SECRET + b"\n\n")
    assert Key.from_env({ENV_VAR: (SECRET + b"\n\n").decode()}) == Key.from_file(tmp_path / "k2.key") \
        == Key.from_bytes(SECRET + b"\n")
    with pytest.raises(InvalidKey, match="set but empty"):
        Key.from_env({ENV_VAR: "\n"})


def test_from_env_refusals(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(InvalidKey, match=f"{ENV_VAR} is not set"):
        Key.from_env()
    with pytest.raises(InvalidKey, match="set but empty"):
        Key.from_env({ENV_VAR: ""})
    with pytest.raises(InvalidKey, match="at least 16"):
        Key.from_env({ENV_VAR: "tiny"})


def test_load_precedence(tmp_path, monkeypatch):
    path = tmp_path / "key"
    path.write_bytes(SECRET)
    monkeypatch.setenv(ENV_VAR, OTHER.decode())
    assert Key.load(path) == Key.from_bytes(SECRET)  # file beats env
    assert Key.load() == Key.from_bytes(OTHER)  # env beats random
    monkeypatch.delenv(ENV_VAR)
    drawn = Key.load()
    assert drawn.reproducible is False
    assert Key.load(None, {}).reproducible is False
    with pytest.raises(InvalidKey, match="set but empty"):
        Key.load(None, {ENV_VAR: ""})


def test_undecodable_text_does_not_crash(key):
    # pydicom can hand back lone surrogates for bytes it could not decode.
    assert key.patient_name("BAD\udcff^NAME") != key.patient_name("BAD^NAME")
    assert re.fullmatch(r"ANON\^[A-Z2-7]{16}", key.patient_name("BAD\udcff^NAME"))


def test_from_file_bytes_same_rules_as_from_file():
    assert Key.from_file_bytes(SECRET + b"\n", name="gs://bucket/key") == Key.from_bytes(SECRET)
    assert Key.from_file_bytes(SECRET, name="gs://bucket/key").source == "--key-file 'gs://bucket/key'"
    with pytest.raises(InvalidKey, match=re.escape("--key-file 'gs://bucket/key': the key file is empty")):
        Key.from_file_bytes(b"\r\n", name="gs://bucket/key")
