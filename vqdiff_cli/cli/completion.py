"""Static shell completion scripts (bash, zsh, fish) generated from the Typer app's commands and options, and
`vqdiff completion SHELL`, which prints one.

`scripts/completions.py` writes them into `completions/`, `vqdiff completion SHELL` prints them, and a test fails if
the files in the repository are stale. Static scripts complete instantly and need no Python at TAB time.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError, excerpt
from ..options import DEVICES, DTYPE_CHOICES, KNOWN_MODES, MASK_MODES, REVEALS, SAMPLERS, STRIDE_MODES, VARIANTS
from .console import Output

# values offered after an option: the choices of options.py
VALUE_CHOICES: dict[str, tuple[str, ...]] = {
    "--device": DEVICES,
    "--dtype": DTYPE_CHOICES,
    "--variant": VARIANTS,
    "--mask-mode": MASK_MODES,
    "--known": KNOWN_MODES,
    "--sampler": SAMPLERS,
    "--reveal": REVEALS,
    "--stride-mode": STRIDE_MODES,
}
# file name templates (strings, not paths, to the app): completed as file names all the same
FILE_TEMPLATES = ("--output", "--animate")
SHELLS = ("bash", "zsh", "fish")
# values offered for a command's arguments, by command name
ARGUMENT_CHOICES: dict[str, tuple[str, ...]] = {"completion": SHELLS}
HEADER = "generated from the vqdiff app by scripts/completions.py; do not edit"


@dataclass
class Opt:
    names: list[str]  # e.g. ["--output", "-o"]
    takes_value: bool
    is_path: bool
    help: str


@dataclass
class Cmd:
    name: str
    help: str
    options: list[Opt] = field(default_factory=list)
    path_arguments: bool = False
    argument_choices: tuple[str, ...] = ()
    children: list[Cmd] = field(default_factory=list)


def _short_help(text: str | None) -> str:
    text = re.sub(r"\s*\[default:[^\]]*\]", "", (text or "").strip().splitlines()[0] if text else "")
    text = text.split(". ")[0].rstrip(".")
    return text[:80]


def _mentions_path(annotation: Any) -> bool:
    """`Path`, `Path | None`, `list[Path]`, ..."""
    return annotation is Path or any(_mentions_path(arg) for arg in typing.get_args(annotation))


def _is_path(param: Any) -> bool:
    """Whether a parameter takes a file name: click's `path` type, or (Typer 0.29 and later, whose parameters carry
    their annotation instead) a `Path` annotation; or a file name template."""
    if any(name in FILE_TEMPLATES for name in getattr(param, "opts", ())):
        return True
    kind = getattr(param, "type", None)
    if kind is not None:
        return getattr(kind, "name", "") == "path"
    return _mentions_path(getattr(getattr(param, "type_descriptor", None), "annotation", None))


def _tree(command: Any, name: str) -> Cmd:
    node = Cmd(
        name=name,
        help=_short_help(getattr(command, "help", None) or getattr(command, "short_help", None)),
        argument_choices=ARGUMENT_CHOICES.get(name, ()),
    )
    for param in getattr(command, "params", []):
        if getattr(param, "hidden", False):
            continue
        if getattr(param, "param_type_name", "") == "argument":
            node.path_arguments = node.path_arguments or _is_path(param)
            continue
        names = [*param.opts, *getattr(param, "secondary_opts", [])]
        names.sort(key=lambda n: (not n.startswith("--"), n))
        node.options.append(
            Opt(
                names,
                not getattr(param, "is_flag", False),
                _is_path(param),
                _short_help(getattr(param, "help", "")),
            )
        )
    node.options.append(Opt(["--help", "-h"], False, False, "Show help and exit"))
    for child_name, child in sorted(getattr(command, "commands", {}).items()):
        if not getattr(child, "hidden", False):
            node.children.append(_tree(child, child_name))
    return node


def command_tree(app: typer.Typer | Any) -> Cmd:
    """The commands and options of `app`: the Typer app, or the click command it became (a running command's root)."""
    return _tree(typer.main.get_command(app) if isinstance(app, typer.Typer) else app, "vqdiff")


def _flat(node: Cmd, prefix: str = "") -> list[tuple[str, Cmd]]:
    """(path, command) for every command: "", "generate", "config path", ..."""
    out = [(prefix, node)]
    for child in node.children:
        out += _flat(child, f"{prefix} {child.name}".strip())
    return out


def _ident(path: str) -> str:
    return re.sub(r"[^a-z0-9]", "_", path) or "root"


def bash(root: Cmd) -> str:
    lines = [
        f"# bash completion for vqdiff ({HEADER})",
        "_vqdiff() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        '    local path="" word i skip=0 opts="" valued="" paths="" subs="" args=""',
    ]
    # walk the words before the cursor to find the (sub)command, skipping option values
    lines += [
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        word="${COMP_WORDS[i]}"',
        "        if ((skip)); then skip=0; continue; fi",
        '        case "$word" in',
        '            -*) [[ " $(_vqdiff_valued "$path") " == *" $word "* ]] && skip=1 ;;',
        '            *) [[ " $(_vqdiff_subs "$path") " == *" $word "* ]] && path="${path:+$path }$word" ;;',
        "        esac",
        "    done",
        '    opts="$(_vqdiff_opts "$path")"; valued="$(_vqdiff_valued "$path")"',
        '    paths="$(_vqdiff_paths "$path")"; subs="$(_vqdiff_subs "$path")"; args="$(_vqdiff_args "$path")"',
        '    case "$prev" in',
    ]
    for flag, choices in VALUE_CHOICES.items():
        lines.append(f'        {flag}) COMPREPLY=($(compgen -W "{" ".join(choices)}" -- "$cur")); return ;;')
    lines += [
        "    esac",
        '    if [[ " $valued " == *" $prev "* ]]; then',
        '        if [[ " $paths " == *" $prev "* ]]; then COMPREPLY=($(compgen -f -- "$cur")); fi',
        "        return",
        "    fi",
        '    if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "$opts" -- "$cur")); return; fi',
        '    if [[ -n "$subs" ]]; then COMPREPLY=($(compgen -W "$subs" -- "$cur")); return; fi',
        '    if [[ -n "$args" ]]; then COMPREPLY=($(compgen -W "$args" -- "$cur")); return; fi',
        '    COMPREPLY=($(compgen -f -- "$cur"))',
        "}",
        "",
    ]
    tables: dict[str, dict[str, str]] = {"opts": {}, "valued": {}, "paths": {}, "subs": {}, "args": {}}
    for path, node in _flat(root):
        tables["opts"][path] = " ".join(n for o in node.options for n in o.names)
        tables["valued"][path] = " ".join(n for o in node.options if o.takes_value for n in o.names)
        tables["paths"][path] = " ".join(n for o in node.options if o.is_path for n in o.names)
        tables["subs"][path] = " ".join(c.name for c in node.children)
        tables["args"][path] = " ".join(node.argument_choices)
    for table, rows in tables.items():
        lines.append(f"_vqdiff_{table}() {{")
        lines.append('    case "$1" in')
        for path, value in rows.items():
            lines.append(f'        "{path}") echo "{value}" ;;')
        lines += ["    esac", "}"]
    lines += ["complete -o default -o bashdefault -F _vqdiff vqdiff", ""]
    return "\n".join(lines)


def _zsh_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "'\\''").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")


def _zsh_specs(node: Cmd) -> list[str]:
    specs = []
    for opt in node.options:
        action = ""
        if opt.takes_value:
            choices = next((VALUE_CHOICES[n] for n in opt.names if n in VALUE_CHOICES), None)
            if choices:
                action = f":value:({' '.join(choices)})"
            elif opt.is_path:
                action = ":file:_files"
            else:
                action = ":value:"
        exclusive = f"({' '.join(opt.names)})" if len(opt.names) > 1 else ""
        names = "{" + ",".join(opt.names) + "}" if len(opt.names) > 1 else opt.names[0]
        specs.append(
            f"'{exclusive}'{names}'[{_zsh_escape(opt.help)}]{action}'"
            if exclusive
            else f"'{names}[{_zsh_escape(opt.help)}]{action}'"
        )
    return specs


def _zsh_function(node: Cmd, fname: str) -> list[str]:
    lines = [f"{fname}() {{"]
    specs = _zsh_specs(node)
    if node.children:
        lines += [
            '    local curcontext="$curcontext" state line',
            "    typeset -A opt_args",
            "    _arguments -C \\",
            *(f"        {s} \\" for s in specs),
            "        '1: :->command' \\",
            "        '*:: :->args'",
            "    case $state in",
            "        command)",
            "            local -a commands",
            "            commands=(",
        ]
        lines += [f"                '{c.name}:{_zsh_escape(c.help)}'" for c in node.children]
        lines += [
            "            )",
            "            _describe 'command' commands ;;",
            "        args)",
            "            case $words[1] in",
        ]
        lines += [f"                {c.name}) {fname}_{_ident(c.name)} ;;" for c in node.children]
        lines += ["            esac ;;", "    esac", "}"]
        for child in node.children:
            lines += _zsh_function(child, f"{fname}_{_ident(child.name)}")
    else:
        if node.argument_choices:
            rest = f"'1:value:({' '.join(node.argument_choices)})'"
        else:
            rest = "'*:file:_files'" if node.path_arguments else "'*: :'"
        lines += ["    _arguments \\", *(f"        {s} \\" for s in specs), f"        {rest}", "}"]
    return lines


def zsh(root: Cmd) -> str:
    lines = ["#compdef vqdiff", f"# zsh completion for vqdiff ({HEADER})", ""]
    lines += _zsh_function(root, "_vqdiff")
    lines += ["", '_vqdiff "$@"', ""]
    return "\n".join(lines)


def _fish_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def fish(root: Cmd) -> str:
    lines = [f"# fish completion for vqdiff ({HEADER})", "complete -c vqdiff -f"]
    for path, node in _flat(root):
        words = path.split()
        if not words:
            cond = "__fish_use_subcommand"
        elif len(words) == 1 and node.children:
            cond = f"__fish_seen_subcommand_from {words[0]}; and not __fish_seen_subcommand_from " + " ".join(
                c.name for c in node.children
            )
        else:
            cond = " ; and ".join(f"__fish_seen_subcommand_from {w}" for w in words)
        for child in node.children:
            lines.append(f"complete -c vqdiff -n '{cond}' -a {child.name} -d '{_fish_escape(child.help)}'")
        if words and not node.children:
            for opt in node.options:
                parts = [f"complete -c vqdiff -n '{cond}'"]
                for n in opt.names:
                    parts.append(f"-l {n[2:]}" if n.startswith("--") else f"-s {n[1:]}")
                if opt.takes_value:
                    choices = next((VALUE_CHOICES[n] for n in opt.names if n in VALUE_CHOICES), None)
                    if choices:
                        parts.append(f"-x -a '{' '.join(choices)}'")
                    elif opt.is_path:
                        parts.append("-r -F")
                    else:
                        parts.append("-x")
                parts.append(f"-d '{_fish_escape(opt.help)}'")
                lines.append(" ".join(parts))
            if node.argument_choices:
                lines.append(f"complete -c vqdiff -n '{cond}' -a '{' '.join(node.argument_choices)}'")
            elif node.path_arguments:
                lines.append(f"complete -c vqdiff -n '{cond}' -F")
        elif not words:
            for opt in node.options:
                parts = [f"complete -c vqdiff -n '{cond}'"]
                parts += [f"-l {n[2:]}" if n.startswith("--") else f"-s {n[1:]}" for n in opt.names]
                parts.append(f"-d '{_fish_escape(opt.help)}'")
                lines.append(" ".join(parts))
    lines.append("")
    return "\n".join(lines)


def script(shell: str, root: Cmd) -> str:
    return {"bash": bash, "zsh": zsh, "fish": fish}[shell](root)


FILES = {"bash": "vqdiff.bash", "zsh": "_vqdiff", "fish": "vqdiff.fish"}


def completion(
    ctx: typer.Context,
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the completion script for a shell (see the README for where to put it)."""
    if shell not in SHELLS:
        raise UsageError(f"unknown shell '{excerpt(shell)}'", hint=f"use one of: {', '.join(SHELLS)}")
    Output().result(script(shell, command_tree(ctx.find_root().command)).rstrip("\n"))
