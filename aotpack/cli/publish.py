"""`aotpack push` / `aotpack pull`: results (URLs, paths) on stdout, progress and warnings on stderr.

Options follow the `hf` CLI (positional REPO_ID, --revision, --private, --token, --local-dir).
"""

from __future__ import annotations

import click

_TOKEN_HELP = "Hub token (default: HF_TOKEN, else the `hf auth login` token). Never printed."


@click.command()
@click.argument("package")
@click.argument("repo_id")
@click.option("--revision", default=None,
              help="Branch to push to (created when missing); with --create-pr, the branch the PR targets.")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--token", default=None, help=_TOKEN_HELP)
@click.option("--commit-message", default=None, help="Commit summary (default names target, model and torch).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--repair-index", is_flag=True,
              help="File stores: write a damaged aotpack_index.json again from the store's verified package "
                   "folders (the damaged file is kept beside it).")
def push(package, repo_id, revision, private, token, commit_message, create_pr, repair_index):
    """Publish PACKAGE to REPO_ID (owner/name, hf://owner/name or file:///store), in a folder named after its target.

    The repo's aotpack_index.json and README.md are merged with what is already there.
    """
    from .output import quiet_libraries

    quiet_libraries()
    from ..store.publish import push_package

    result = push_package(package, repo_id, revision=revision, private=private, token=token,
                          commit_message=commit_message, create_pr=create_pr, repair_index=repair_index,
                          progress=True)
    if result.pr_url:
        click.echo(f"pull request opened for {result.target}", err=True)
    click.echo(result.pr_url or result.url)


@click.command()
@click.argument("repo_id")
@click.option("--target", default="auto", show_default=True,
              help="Target folder to download; 'auto' picks the one for this machine's GPU.")
@click.option("--revision", default=None, help="Branch, tag or commit (Hub repos only).")
@click.option("--local-dir", type=click.Path(file_okay=False), default=None,
              help="Put the files here instead of the Hugging Face cache (file stores: instead of in place).")
@click.option("--token", default=None, help=_TOKEN_HELP)
@click.option("--overwrite", is_flag=True,
              help="Replace the target folder in --local-dir even if it holds files aotpack did not write.")
def pull(repo_id, target, revision, local_dir, token, overwrite):
    """Download one target's package from REPO_ID (owner/name, hf://… or file:///store), verified; print its path."""
    from .output import quiet_libraries

    quiet_libraries()
    from ..store.publish import pull_package

    pulled = pull_package(repo_id, target=target, revision=revision, local_dir=local_dir, token=token,
                          overwrite=overwrite,
                          progress=True)
    if pulled.warning:
        click.echo(f"warning: {pulled.warning}", err=True)
    click.echo(str(pulled.path))
