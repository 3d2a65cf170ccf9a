"""`klaus index`, `klaus search` and `klaus serve`: the photo library (:mod:`klaus.index`, :mod:`klaus.web`).

Same conventions as the rest of the CLI: ``--json`` prints JSON objects one per line,
and every error is one line on stderr with exit status 1 (raised as KlausError or
click exceptions, which :class:`klaus.cli.common.KlausGroup` formats).
"""

from __future__ import annotations

import sys

import click

from ..names import shown
from .common import PRESERVE, emit, json_option, model_option

WARNINGS_SHOWN = 20  # warnings of each kind printed; --json has them all (up to 1000)


def _db_path(db: str | None) -> str:
    from ..index.db import default_db_path

    return db or str(default_db_path())


db_option = click.option(
    "--db",
    "db",
    metavar="FILE",
    help="The photo index (default: $KLAUS_DB, else ~/.local/share/klaus/library.db).",
)


@click.command("index", context_settings=PRESERVE)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@db_option
@model_option
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Threads that read, hash and decode photos ahead of the model.",
)
@click.option(
    "--batch",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Photos per transaction and per Dask task (the model runs them 4 per call).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=None,
    help="ONNX Runtime threads per model call (default: 1, with one call per core in flight).",
)
@click.option(
    "--dask",
    "dask_address",
    metavar="ADDRESS",
    help="Decode and classify on this Dask scheduler (e.g. tcp://host:8786).",
)
@json_option
def index_command(paths, db, model, workers, batch, threads, dask_address, as_json) -> int:
    """Classify the photos under PATH... into the index: new, changed and failed ones; skip the rest.

    JPEG, PNG, WebP, GIF (first frame), TIFF and BMP (HEIC with pillow-heif). Photos
    that are gone are marked so; a different model re-indexes everything. Bad files
    are recorded with their error and the run goes on (exit status 0); so do anything
    that is not a regular file (pipes, devices). Folders that cannot be read, and files
    and folders whose names are not valid UTF-8 (the index cannot store them), are
    named in warnings and left out. JSON: one summary object {"photos","indexed",
    "skipped","failed","gone","unreadable_folders","unstorable","seconds",
    "images_per_second","model","db","errors","unreadable_folder_errors",
    "unstorable_errors"}, each list of {"path","error"}.
    """
    from ..index.indexer import index_paths

    db_path = _db_path(db)

    def on_plan(summary, plan) -> None:
        if as_json:
            return
        click.echo(
            f"{summary.photos} photos: {len(plan.tasks)} to classify, {plan.skipped} unchanged"
            + (f", {summary.gone} gone" if summary.gone else "")
            + (f"; {summary.unreadable_folders} folder(s) could not be read" if summary.unreadable_folders else "")
            + (f"; {summary.unstorable} left out (name not valid UTF-8)" if summary.unstorable else ""),
            err=True,
        )
        _warn_each(summary.unreadable_folder_errors, summary.unreadable_folders, "unreadable folders")
        _warn_each(summary.unstorable_errors, summary.unstorable, "files or folders left out")

    summary = index_paths(
        paths,
        db_path,
        model=model,
        workers=workers,
        batch=batch,
        threads=threads,
        dask=dask_address,
        progress=False if as_json else None,
        on_plan=on_plan,
    )
    if as_json:
        emit(summary.to_dict())
        return 0
    _warn_each(summary.errors, summary.failed, "unreadable photos")
    click.echo(
        f"{shown(db_path)}: indexed {summary.indexed}, skipped {summary.skipped}, failed {summary.failed}, "
        f"gone {summary.gone}"
        + (f", left out {summary.unstorable}" if summary.unstorable else "")
        + f" in {summary.seconds:.1f} s ({summary.images_per_second:.1f} images/s, {summary.model})"
    )
    return 0


def _warn_each(problems: list[dict], total: int, what: str, shown_max: int = WARNINGS_SHOWN) -> None:
    """One warning line per problem ({"path","error"}), the first ``shown_max``; then how many more."""
    for problem in problems[:shown_max]:
        click.echo(f"klaus: warning: {shown(problem['path'])}: {shown(problem['error'])}", err=True)
    if total > shown_max:
        click.echo(f"klaus: warning: ... and {total - shown_max} more {what} (see --json)", err=True)


def _probability(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """FloatRange lets NaN through (every comparison with it is false)."""
    if value != value:
        raise click.BadParameter(f"{value} is not a number between 0 and 1.", ctx=ctx, param=param)
    return value


@click.command("search", context_settings=PRESERVE)
@click.argument("query", nargs=-1, required=True, metavar="QUERY")
@db_option
@click.option(
    "--min-prob",
    type=click.FloatRange(0.0, 1.0),
    default=0.2,
    show_default=True,
    callback=_probability,
    help="Only photos with at least this much top-5 probability under the concept.",
)
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True, help="Show at most N photos.")
@json_option
def search_command(query, db, min_prob, limit, as_json) -> int:
    """Photos of a concept: a class name, any WordNet synonym or ancestor ("dog", "vehicle"), or a wnid.

    Ranked by the probability mass of each photo's top-5 under the concept. JSON: one
    object per photo {"rank","id","path","score","label","probability","matches"}.
    """
    from ..index.db import Database, sqlite_errors
    from ..index.search import search

    text = " ".join(query)
    db_path = _db_path(db)
    with Database(db_path, readonly=True) as database, sqlite_errors(db_path):
        result = search(database.conn, text, min_prob=min_prob, limit=limit)
    if as_json:
        for rank, hit in enumerate(result.hits, 1):
            emit(hit.to_dict(rank))
        return 0
    concepts = "; ".join(
        f"{shown(c.name)} ({c.wnid}, {c.classes} class{'es' if c.classes != 1 else ''})" for c in result.concepts
    ) or shown(text)
    partial = f", showing {len(result.hits)}" if len(result.hits) < result.total else ""
    click.echo(f"{concepts}: {result.total} photo{'s' if result.total != 1 else ''}{partial}")
    for rank, hit in enumerate(result.hits, 1):
        best = hit.matches[0]["label"] if hit.matches else hit.label
        click.echo(f"  {rank:>3}. {hit.score * 100:5.1f}%  {shown(hit.path)}  ({shown(best)})")
    return 0


@click.command("serve", context_settings=PRESERVE)
@db_option
@model_option
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind; the default is this machine only."
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--max-upload-mb",
    type=click.IntRange(1, 200),
    default=20,
    show_default=True,
    help="Largest photo 'classify' accepts.",
)
@click.option(
    "--jobs",
    type=click.IntRange(1, 64),
    default=None,
    help="Photos decoded at once for thumbnails and classify (default: one per core, at most 4).",
)
@click.option(
    "--queue",
    type=click.IntRange(0, 1024),
    default=None,
    help="Requests that may wait for a decoding turn (default: 64); one more is answered 503 with Retry-After.",
)
@json_option
def serve_command(db, model, host, port, max_upload_mb, jobs, queue, as_json) -> int:
    """A local web gallery: browse by the WordNet tree, search, photo pages, classify a new photo.

    The index and the model are checked before the server starts (one-line errors). Decoding
    runs within a memory budget, a few photos at a time (--jobs, --queue); images larger than
    $KLAUS_MAX_PIXELS pixels are refused.
    """
    try:
        import uvicorn

        from ..web.app import create_app
        from ..web.pool import DEFAULT_JOBS, DEFAULT_QUEUE
    except ImportError as exc:
        raise click.ClickException(
            f"klaus serve needs the 'web' extra ({exc.name} is missing): pip install 'klaus-classifier[web]'"
        ) from None
    db_path = _db_path(db)
    app = create_app(
        db_path,
        model=model,
        max_upload=max_upload_mb * 1024 * 1024,
        host=host,
        jobs=jobs or DEFAULT_JOBS,
        queue=DEFAULT_QUEUE if queue is None else queue,
    )
    app.state.gallery.load_model()  # now: a bad model is a one-line error here, not a 503 later
    sock = _listen(host, port)
    port = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"klaus: warning: listening on {host}: anyone who can reach it can see your photo index", err=True)
    if as_json:
        emit({"url": url, "db": db_path})
    else:
        click.echo(f"klaus: serving {shown(db_path)} at {url} (Ctrl-C to stop)", err=True)
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0


def _listen(host: str, port: int):
    """Bind (and listen) first, so a busy port is a one-line error, --port 0 picks a free one, and
    the URL printed is connectable at once."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections to the announced URL wait in the backlog until uvicorn accepts them
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


COMMANDS = (index_command, search_command, serve_command)
