"""What the system shardflow replaces detected for each corpus file, computed by pandas itself.

For every file named in corpus.json: the columns, pandas dtypes and BigQuery types by the seed's
rules (`pd.read_csv` / `pd.read_json` on the first 5 MB; int* INT64, float* FLOAT64, bool BOOL,
datetime64 TIMESTAMP, object TIMESTAMP when `pd.to_datetime` parses it, else STRING), the
schema fingerprint (MD5 of "name:TYPE|..."), and every row as pandas reads it, each value in one
canonical text form the Rust test compares with what BigQuery holds after a `dispatcher run`.

Usage: python pandas_reference.py <corpus dir>  (prints one JSON document)
"""

import hashlib
import io
import json
import math
import sys
import warnings
from pathlib import Path

import pandas as pd

SAMPLE_BYTES = 5 * 1024 * 1024
# pandas' default float parsers can be one unit in the last place off the decimal text
# ("6.076" reads as 6.0760000000000005); shardflow loads the correctly rounded value the text
# says, so the reference reads floats with pandas' exact parsers. Types do not depend on it.
FLOAT_PRECISION = "round_trip"


def read(path: Path, entry: dict) -> pd.DataFrame:
    sample = path.read_bytes()[:SAMPLE_BYTES]
    if entry["format"] == "csv":
        options = entry.get("options", {})
        return pd.read_csv(
            io.BytesIO(sample),
            sep=options.get("delimiter", ","),
            encoding=options.get("encoding", "utf-8"),
            float_precision=FLOAT_PRECISION,
        )
    text = sample.decode(entry.get("options", {}).get("encoding", "utf-8"))
    # JSON lines as the seed read them; a top-level array as pandas reads one (records).
    lines = not text.lstrip().startswith("[")
    return pd.read_json(io.StringIO(text), lines=lines, precise_float=True)


def bigquery_type(series: pd.Series) -> str:
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "BOOL"
    if pd.api.types.is_integer_dtype(dtype):
        return "INT64"
    if pd.api.types.is_float_dtype(dtype):
        return "FLOAT64"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "TIMESTAMP"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pd.to_datetime(series)
        return "TIMESTAMP"
    except Exception:
        return "STRING"


def canonical(series: pd.Series, bq: str) -> list:
    if bq == "TIMESTAMP":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = pd.to_datetime(series, utc=True)
        return [None if pd.isna(t) else t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") for t in times]
    out = []
    for v in series.tolist():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        elif bq == "BOOL":
            out.append("true" if v else "false")
        elif bq == "INT64":
            out.append(str(int(v)))
        elif bq == "FLOAT64":
            out.append(repr(float(v)))
        else:
            out.append(str(v))
    return out


def main() -> None:
    root = Path(sys.argv[1])
    entries = json.loads((root / "corpus.json").read_text())
    result = {}
    for entry in entries:
        path = root / entry["file"]
        df = read(path, entry)
        columns = []
        for name in df.columns:
            bq = bigquery_type(df[name])
            columns.append({"name": str(name), "dtype": str(df[name].dtype), "bigquery_type": bq})
        text = "|".join(f"{c['name']}:{c['bigquery_type']}" for c in columns)
        values = [canonical(df[name], c["bigquery_type"]) for name, c in zip(df.columns, columns)]
        result[entry["file"]] = {
            "columns": columns,
            "schema_fingerprint": hashlib.md5(text.encode()).hexdigest(),
            "rows": [list(row) for row in zip(*values)] if values else [],
        }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
