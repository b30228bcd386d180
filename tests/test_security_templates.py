"""Templates are data: every jinja2 template a recipe or the user hands bard_data (the teacher,
compression and judge prompts, the question and budget templates, the card given with
``--template``) renders in jinja2's immutable sandbox.

The payload table: attribute walks to ``os`` through ``__globals__``, ``__subclasses__``,
``self``, ``config``, the ``|attr`` filter, subscripts, and format-string tricks, each in every
recipe template key and in ``--template``. Each must be a one-line error (naming the recipe key,
before any work) and must not run: every payload that would run ``touch`` a marker file, and the
marker must not exist afterwards. Legitimate templates (loops, filters, conditionals over the
documented variables, and every template of the shipped recipes) render exactly as before.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jinja2
import pytest
import yaml

from bard_data.cli import main
from bard_data.config.stages import (
    DEFAULT_BUDGET_TEMPLATE,
    DEFAULT_COMPRESSION_PROMPT,
    DEFAULT_JUDGE_PROMPT,
    DEFAULT_QUESTION_TEMPLATE,
    DEFAULT_TEACHER_PROMPT,
)
from bard_data.errors import BardError
from bard_data.text.templates import render
from tests.fixtures_run import make_run
from tests.recipes import tiny_recipe, write_recipe

REPO = Path(__file__).resolve().parents[1]
TOUCH = "touch MARKER"

# name -> a template that, if it ran, would create MARKER (or, for the format-string tricks that
# cannot call, read what the sandbox forbids).
PAYLOADS = {
    "cycler_globals_os": "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "joiner_globals_os": "{{ joiner.__init__.__globals__.os.system('touch MARKER') }}",
    "lipsum_globals": "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
    "namespace_globals": "{{ namespace.__init__.__globals__.os.system('touch MARKER') }}",
    "self_builtins_import": "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch MARKER') }}",
    "self_module": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "config_walk": "{{ config.__class__.__init__.__globals__['os'].popen('touch MARKER').read() }}",
    "subclasses_popen": ("{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
                         "{{ c(['touch', 'MARKER']).wait() }}{% endif %}{% endfor %}"),
    "dict_mro_subclasses": ("{% for c in dict.mro()[-1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
                            "{{ c(['touch', 'MARKER']).wait() }}{% endif %}{% endfor %}"),
    "attr_filter": "{{ (cycler|attr('__init__')|attr('__globals__'))['os'].system('touch MARKER') }}",
    "attr_filter_concat": "{{ (cycler|attr('_' ~ '_init__')|attr('__glo' ~ 'bals__'))['os'].system('touch MARKER') }}",
    "subscript_walk": "{{ cycler['__init__']['__globals__']['os']['system']('touch MARKER') }}",
    "set_then_call": "{% set o = cycler.__init__.__globals__.os %}{{ o.system('touch MARKER') }}",
    "hidden_branch": ("{% if question == 'never-in-preflight' %}{{ cycler.__init__.__globals__.os.system('touch MARKER') }}"
                      "{% endif %}"),
    "format_string": "{{ '{0.__init__.__globals__[os]}'.format(cycler) }}",
    "format_map": "{{ '{c.__init__.__globals__}'.format_map({'c': cycler}) }}",
    "format_via_attr": "{{ ('{0.__class__.__mro__}'|attr('format'))(cycler) }}",
    "percent_format_obj": "{{ '%s'|format(cycler.__init__.__globals__.os.system('touch MARKER')) }}",
}

# recipe key -> (section path in the recipe dict, the legitimate part every variant keeps)
TEMPLATE_KEYS = {
    "teacher.prompt_template": (("teacher", "prompt_template"), "{{ question }}"),
    "compression.prompt_template": (("compression", "prompt_template"), "{{ question }} {{ reasoning }} {{ target }}"),
    "judge.prompt_template": (("judge", "prompt_template"), "{{ question }} {{ compressed }}"),
    "format.question_template": (("format", "question_template"), "{{ question }}"),
    "format.budget_template": (("format", "budget_template"), "Thinking budget: {{ budget }} tokens."),
}


def _payload(name: str, marker: Path) -> str:
    return PAYLOADS[name].replace("MARKER", str(marker))


def _error_line(capsys) -> str:
    """The one error line (progress bars aside), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("key", list(TEMPLATE_KEYS))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_recipe_template_payload_is_a_one_line_error_at_preflight(payload, key, tmp_path, tiny_model_dir, shared_data,
                                                                 capsys):
    marker = tmp_path / "INJECTED"
    (section, field), legit = TEMPLATE_KEYS[key]
    data = tiny_recipe(tmp_path, tiny_model_dir, shared_data, n_problems=2)
    data.setdefault(section, {})[field] = _payload(payload, marker) + legit
    recipe = write_recipe(tmp_path, data)
    rc = main(["run", str(recipe), "-q", "--until", "problems"])  # were preflight passed: no LLM stage
    assert not marker.exists(), f"{payload} in {key} ran"
    assert rc == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {recipe}: {key}: template error: "), line
    assert not (tmp_path / "run").exists()  # before any work: no run directory left behind


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_render_refuses_payload_at_runtime(payload, tmp_path):
    """Past preflight (a branch taken only by some row), rendering still refuses."""
    marker = tmp_path / "INJECTED"
    tpl = _payload(payload, marker).replace("'never-in-preflight'", "question")
    with pytest.raises(BardError) as e:
        render(tpl + "{{ question }}", question="q", budget=1)
    assert "\n" not in str(e.value) and "template" in str(e.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("cardrun") / "run")


CARD_PAYLOADS = {
    **PAYLOADS,
    # the card's context holds report frames: their methods (write_csv ...) must not be reachable
    "frame_method_write": "{{ report.funnel.write_csv('MARKER') }}",
    "part_frame_write": "{% for p in parts %}{{ p.df.write_parquet('MARKER') }}{% endfor %}",
    "include_outside": "{% include '../../../../../../../etc/hostname' %}",
}


@pytest.mark.parametrize("payload", list(CARD_PAYLOADS))
def test_card_template_payload_is_a_one_line_error(payload, run_dir, tmp_path, capsys):
    marker = tmp_path / "INJECTED"
    tpl = tmp_path / "card.md.j2"
    tpl.write_text("# {{ name }}\n" + CARD_PAYLOADS[payload].replace("MARKER", str(marker)) + "\n")
    out = tmp_path / "export"
    rc = main(["export", str(run_dir), str(out), "--template", str(tpl)])
    assert not marker.exists(), f"{payload} ran"
    assert rc == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {tpl}: card template error: "), line
    assert not out.exists()


# -- legitimate templates render unchanged -------------------------------------------------------------

VALUES = dict(question="What is 6 x 7?", reasoning="6 x 7 = 42.", answer="42", budget=128, target=100,
              reasoning_tokens=200, original_tokens=200, compressed="42.")
LEGIT = [
    DEFAULT_TEACHER_PROMPT, DEFAULT_COMPRESSION_PROMPT, DEFAULT_JUDGE_PROMPT, DEFAULT_QUESTION_TEMPLATE,
    DEFAULT_BUDGET_TEMPLATE,
    "{% for w in question.split() %}{{ w | upper }}{{ ' ' if not loop.last }}{% endfor %}",
    "{{ question | trim | replace('6', 'six') | truncate(40) }} {{ reasoning | wordcount }}",
    "{% if budget > 100 %}long{% elif budget > 10 %}short{% else %}tiny{% endif %}: {{ budget // 2 }}",
    "{{ '%d tokens' | format(budget) }} / {{ '{} tokens'.format(budget) }} / {{ '%s' % question }}",
    "{% set ns = namespace(n=0) %}{% for c in question %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{{ [question, answer] | join(' | ') }} {{ {'a': budget}.items() | list }} {{ range(3) | list | sum }}",
    "{% macro line(x) %}- {{ x }}{% endmacro %}{{ line(question) }}\n{{ line(answer) }}\n",
    "{{ question.upper().replace('X', 'times') }} {{ reasoning.startswith('6') }} {{ budget is even }}",
]


@pytest.mark.parametrize("tpl", LEGIT)
def test_legitimate_templates_render_as_with_plain_jinja2(tpl):
    plain = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    assert render(tpl, **VALUES) == plain.from_string(tpl).render(**VALUES)


def _template_strings(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _template_strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _template_strings(v, f"{path}[{i}]")
    elif isinstance(obj, str) and "{{" in obj or isinstance(obj, str) and "{%" in obj:
        yield path, obj


@pytest.mark.parametrize("name", ["demo.yaml", "demo_sampled.yaml", "paper.yaml"])
def test_shipped_recipe_templates_render_unchanged(name):
    from bard_data.config.recipe import Recipe

    data = yaml.safe_load((REPO / "recipes" / name).read_text())
    r = Recipe.model_validate(data)  # defaults filled in: every template the build renders
    found = dict(_template_strings(r.model_dump(mode="json")))
    assert {"teacher.prompt_template", "compression.prompt_template", "judge.prompt_template",
            "format.budget_template", "format.question_template"} <= set(found)
    plain = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    for key, tpl in found.items():
        assert render(tpl, **VALUES) == plain.from_string(tpl).render(**VALUES), key


def test_bundled_card_renders_in_the_sandbox(run_dir, tmp_path):
    from bard_data.report.card import default_template_path

    out = tmp_path / "export"
    assert main(["export", str(run_dir), str(out), "--template", str(default_template_path())]) == 0
    card = (out / "README.md").read_text()
    assert "## Statistics" in card and "| config | splits | rows | contents |" in card
    shutil.rmtree(out)
