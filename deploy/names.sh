# Topic and subscription names, as `dispatcher` and `worker` read them (SHARDFLOW_… or the
# defaults). Sourced by pubsub-setup.sh and iam.sh.
JOBS_TOPIC=${SHARDFLOW_JOBS_TOPIC:-etl-jobs}
JOBS_SUB=${SHARDFLOW_JOBS_SUBSCRIPTION:-etl-jobs-dispatcher}
SHARDS_TOPIC=${SHARDFLOW_SHARDS_TOPIC:-etl-shards}
SHARDS_SUB=${SHARDFLOW_SHARDS_SUBSCRIPTION:-etl-shards-workers}
RESULTS_TOPIC=${SHARDFLOW_RESULTS_TOPIC:-etl-shard-results}
RESULTS_SUB=${SHARDFLOW_RESULTS_SUBSCRIPTION:-etl-shard-results-dispatcher}
DEAD_TOPIC=${SHARDFLOW_DEAD_LETTER_TOPIC:-etl-shards-dead-letter}
DEAD_SUB=${SHARDFLOW_DEAD_LETTER_SUBSCRIPTION:-etl-shards-dead-letter-dispatcher}
