-- A withdrawal is an e-signed act (21 CFR 11.50, 11.200): whoever records it re-enters their
-- own password, and the row keeps the signer (name and account) and the meaning, as a
-- consent signature does. Staff recording a participant's request say how it reached them.
ALTER TABLE consents
    ADD COLUMN received_via text
        CHECK (received_via IN ('in_person', 'phone', 'video_visit', 'letter', 'email')),
    ADD CONSTRAINT consents_withdrawal_signed CHECK (
        action = 'consent'
        OR (signer_user_id IS NOT NULL AND signer_name IS NOT NULL AND meaning IS NOT NULL)
    ) NOT VALID;
