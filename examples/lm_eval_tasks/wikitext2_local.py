"""WikiText-2 raw lines -> one document per article, as lm-eval's `wikitext` task reads its document-level copy."""

import re

import datasets

# An article starts at a top-level heading line " = Title = " (sections are " = = Section = = ").
ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def articles(lines: datasets.Dataset) -> datasets.Dataset:
    documents = []
    for line in lines["text"]:
        if ARTICLE_HEADING.match(line) or not documents:
            documents.append([])
        documents[-1].append(line)
    texts = ["\n".join(document).strip() for document in documents]
    return datasets.Dataset.from_dict({"text": [text for text in texts if text]})
