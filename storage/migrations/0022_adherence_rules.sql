-- Alert rules on adherence: "below X % of the schedule's expectation on each of the last
-- D days the metric was expected" (docs/alerts.md). low holds X, sustained_s holds D days in
-- seconds; the sweep judges them against the participants' complete local days.
ALTER TABLE alert_rules DROP CONSTRAINT alert_rules_kind_check;
ALTER TABLE alert_rules ADD CONSTRAINT alert_rules_kind_check
    CHECK (kind IN ('range', 'missing_data', 'adherence'));
