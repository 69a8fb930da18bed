"""Federation: the aggregator service (``server``), the per-site batch job (``client``), the wire format
(``wire``), provisioning of TLS material and site tokens (``provision``), aggregation strategies with DP
wrappers (``strategies``), a one-machine simulation (``simulate``) and the privacy attacks (``attack``)."""
