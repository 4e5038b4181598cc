"""pandas' reading of each line of a file as a date: the format `guess_datetime_format` gives
it and the UTC time `pd.to_datetime` parses it to (None where it raises). The Rust test
`dates_are_guessed_and_parsed_as_pandas_does` compares shardflow's rules with these.

Usage: python pandas_dates.py dates.txt  (prints one JSON list)
"""

import json
import sys
import warnings

import pandas as pd
from pandas.tseries.api import guess_datetime_format

cases = []
for line in open(sys.argv[1], encoding="utf-8").read().splitlines():
    if not line or line.startswith("#"):
        continue
    value = line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = pd.to_datetime(pd.Series([value], dtype=object), utc=True)[0]
        parsed = None if pd.isna(parsed) else parsed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except Exception:
        parsed = None
    cases.append({"value": value, "format": guess_datetime_format(value), "parsed": parsed})
json.dump(cases, sys.stdout)
