"""MkDocs hook: serve the committed figures of results/ with the site.

Pages link them as `../results/NAME.png` (the path from docs/ in the repository, so the
links work on GitHub too); this hook adds results/*.png to the site's files and rewrites
those links to the copy the site serves.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]


def on_files(files, config):
    for path in sorted((ROOT / "results").rglob("*.png")):
        rel = path.relative_to(ROOT).as_posix()
        files.append(
            File(rel, src_dir=str(ROOT), dest_dir=config["site_dir"], use_directory_urls=False)
        )
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")
    return markdown.replace("](../results/", "](" + "../" * depth + "results/")
