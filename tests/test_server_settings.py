"""Server settings are defined once (``ServerConfig`` fields with ``setting`` metadata) and every
``serve`` flag, its ``INFERCORE_<FLAG>`` variable and its help come from that one definition."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from infercore.server.cli import build_parser
from infercore.server.config import ServerConfig, env_name, flag_name, host_list, positive_int, server_flags

SETTINGS = list(server_flags())
IDS = [f.name for f, _ in SETTINGS]


def sample(flag, tmp_path: Path) -> tuple[str, object]:
    """(text to give on the command line or in the environment, the value it parses to)."""
    if flag.choices:
        return flag.choices[-1], flag.choices[-1]
    if flag.parse in (int, positive_int):
        return "7", 7
    if flag.parse is float:
        return "2.5", 2.5
    if flag.parse is Path:
        path = tmp_path / "setting.pem"
        path.write_text("pem")
        return str(path), path
    if flag.parse is host_list:
        return "images.example, CDN.example:8443", ("images.example", "cdn.example:8443")
    assert flag.parse is None, f"no sample for parse={flag.parse}"
    return "some-value", "some-value"


def test_every_server_config_field_is_a_flag_with_help():
    assert [f.name for f in dataclasses.fields(ServerConfig)] == IDS
    for f, flag in SETTINGS:
        assert flag.help, f"{f.name} has no help"
    names = [flag_name(f, flag) for f, flag in SETTINGS]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(("field", "flag"), SETTINGS, ids=IDS)
def test_each_setting_reads_its_flag_and_its_environment_variable_alike(field, flag, tmp_path, monkeypatch):
    name = flag_name(field, flag)
    if flag.switch:
        assert getattr(build_parser().parse_args(["serve", name]), field.name) is True
        assert getattr(build_parser().parse_args(["serve", "--no-" + name[2:]]), field.name) is False
        monkeypatch.setenv(env_name(field, flag), "true")
        assert getattr(build_parser().parse_args(["serve"]), field.name) is True
        return
    text, value = sample(flag, tmp_path)
    from_flag = getattr(build_parser().parse_args(["serve", name, text]), field.name)
    if flag.repeatable:
        assert env_name(field, flag) is None
        assert from_flag == [text]
        return
    assert from_flag == value
    monkeypatch.setenv(env_name(field, flag), text)
    assert getattr(build_parser().parse_args(["serve"]), field.name) == value
    # the command line wins over the environment
    if not flag.choices:
        other = "8" if value == 7 else text
        assert getattr(build_parser().parse_args(["serve", name, other]), field.name) == sample_of(flag, other)


def sample_of(flag, text: str) -> object:
    return flag.parse(text) if flag.parse else text


def test_without_flags_or_environment_the_config_has_the_field_defaults(monkeypatch):
    from infercore.server.config import config_from_args

    for f, flag in SETTINGS:
        if env_name(f, flag):
            monkeypatch.delenv(env_name(f, flag), raising=False)
    assert config_from_args(build_parser().parse_args(["serve"])) == ServerConfig()


def test_a_bad_environment_value_is_refused_like_a_bad_flag_value(monkeypatch, capsys):
    monkeypatch.setenv("INFERCORE_MAX_CONCURRENT_REQUESTS", "0")
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve"])
    assert info.value.code == 2
    assert "--max-concurrent-requests" in capsys.readouterr().err


def test_serve_help_names_every_flag_with_its_environment_variable(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f, flag in SETTINGS:
        assert flag_name(f, flag) in text
        if env_name(f, flag):
            assert f"[env: {env_name(f, flag)}]" in text


@pytest.mark.parametrize("text", ["http://images.example", "user@images.example", "images.example/cats"])
def test_image_url_hosts_are_host_names_not_urls(text, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--image-url-hosts", text])
    assert "--image-url-hosts" in capsys.readouterr().err
